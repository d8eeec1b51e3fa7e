"""Host copies of KV pages: what preemption by swapping keeps of a request while its pages serve others.

A swap-out gathers the request's pages of every layer on each pipeline stage into one buffer (the
same bucketed programs as KV migration, :mod:`distllm_jax.engine.transfer`) and starts copying it to
the host without waiting; the caller frees the pages at once, since the pool is donated along every
program and so any later step that writes them runs after the gather. :meth:`HostKVStore.settle`
later turns the buffers into host arrays (trimmed of the bucket's padding) and lets the device ones
go. A swap-in puts the host arrays back on each stage's mesh and scatters them into fresh pages.

The functions here work on *pool owners* (see :mod:`distllm_jax.engine.transfer`): objects with
``stages`` (``lo``, ``hi``, ``mesh``, ``pool``, ``buffer_sharding``) and a ``lock``.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from distllm_jax.engine.transfer import gather_pages_jit, page_buckets, page_index, scatter_pages_jit
from distllm_jax.kv_cache import NULL_PAGE
from distllm_jax.shapes import bucket

WARMUP_KEY = "\0swap-warmup"  # a key no request has: the null page swapped out and in at start-up

StageBuffers = list[tuple[Any, Any]]  # per stage, its [layers, pages, page_size, kv_heads, head_dim] K and V


def gather_stages(owner: Any, pages: Sequence[int], size: int) -> list[tuple[jax.Array, jax.Array]]:
    """Dispatch one gather of ``pages`` (padded with the null page to ``size``, a bucket) per stage,
    all its layers, under the owner's lock; returns the device buffers without waiting. The device
    runs them after the steps dispatched before and before any dispatched later (the pool is
    donated along), so the pages may be reused once this returns."""
    with owner.lock:
        return [gather_pages_jit(st.pool, page_index(pages, size, st.mesh), lo=0, hi=st.hi - st.lo)
                for st in owner.stages]


def scatter_stages(owner: Any, pages: Sequence[int], size: int, bufs: StageBuffers) -> None:
    """Write each stage's host K and V (``len(pages)`` pages of its layers) into ``pages`` of its
    pool, padded to ``size`` (a bucket: the padding lands in the null page). The buffers go onto the
    meshes before the lock is taken, so a step being dispatched meanwhile is not held up by the
    copies; the scatters are dispatched under the lock and not waited for."""
    puts = [jax.device_put((_pad_pages(k, size), _pad_pages(v, size)), st.buffer_sharding)
            for st, (k, v) in zip(owner.stages, bufs)]
    with owner.lock:
        for st, (k, v) in zip(owner.stages, puts):
            st.pool, _ = scatter_pages_jit(st.pool, page_index(pages, size, st.mesh), k, v, lo=0)


def _pad_pages(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[1] == size:
        return a
    out = np.zeros((a.shape[0], size, *a.shape[2:]), a.dtype)
    out[:, : a.shape[1]] = a
    return out


def _trim_to_host(a: jax.Array, n: int) -> np.ndarray:
    """The first ``n`` pages of a gathered buffer, as a host array of its own (not a view that would
    keep the padded buffer alive)."""
    h = np.asarray(a)
    return h if h.shape[1] == n else np.ascontiguousarray(h[:, :n])


@dataclasses.dataclass
class SwappedKV:
    """One request's pages off the device, in chunks of at most the top bucket: per chunk its page
    count and per stage its K and V, the gathers' device buffers until :meth:`settle`, then host
    arrays. ``nbytes``: the host bytes of its pages (padding not counted: settling drops it)."""

    counts: list[int]
    device: list[list[tuple[jax.Array, jax.Array]]] | None
    nbytes: int
    host: list[StageBuffers] | None = None

    @property
    def num_pages(self) -> int:
        return sum(self.counts)

    def settle(self) -> list[StageBuffers]:
        """The host arrays, waiting for the gathers (only) when they are not there yet. Safe to call
        from two threads: the host arrays are set before the device buffers are let go."""
        device = self.device
        if device is not None:
            self.host = [[(_trim_to_host(k, n), _trim_to_host(v, n)) for k, v in stages]
                         for n, stages in zip(self.counts, device)]
            self.device = None
        assert self.host is not None
        return self.host


class HostKVStore:
    """The swapped-out copies of one pool owner's requests, by key. Page counts are bucketed with
    ``page_buckets(max_pages)`` (one program per bucket and stage for each direction, compiled by
    :meth:`warmup`); a longer list is moved in chunks of the top bucket."""

    def __init__(self, max_pages: int):
        self.buckets = page_buckets(max_pages)
        self._copies: dict[str, SwappedKV] = {}
        self._mu = threading.Lock()  # guards the dict: the worker and a stats reader may both call

    def _chunks(self, pages: Sequence[int]) -> list[list[int]]:
        top = self.buckets[-1]
        pages = list(pages)
        return [pages[i : i + top] for i in range(0, len(pages), top)]

    def swap_out(self, owner: Any, key: str, pages: Sequence[int]) -> None:
        """Dispatch the gathers of ``pages`` and start their copies to the host; no waiting."""
        with self._mu:
            if key in self._copies:
                raise ValueError(f"{key!r} is already swapped out ({self._copies[key].num_pages} pages)")
        chunks = self._chunks(pages)
        device = [gather_stages(owner, c, bucket(self.buckets, len(c))) for c in chunks]
        nbytes = 0
        for c, stages in zip(chunks, device):
            for k, v in stages:
                k.copy_to_host_async()
                v.copy_to_host_async()
                nbytes += (k.nbytes + v.nbytes) // k.shape[1] * len(c)
        with self._mu:
            self._copies[key] = SwappedKV([len(c) for c in chunks], device, nbytes)

    def swap_in(self, owner: Any, key: str, pages: Sequence[int]) -> None:
        """Scatter the copy under ``key`` into ``pages`` (settling it first if need be), then forget
        it. A failure leaves the copy kept, so the caller may still drop it."""
        with self._mu:
            copy = self._copies.get(key)
        if copy is None:
            raise KeyError(f"no swapped-out KV under {key!r}")
        if len(pages) != copy.num_pages:
            raise ValueError(f"{key!r}: {copy.num_pages} pages were swapped out, swap-in got {len(pages)} pages")
        for c, bufs in zip(self._chunks(pages), copy.settle()):
            scatter_stages(owner, c, bucket(self.buckets, len(c)), bufs)
        self.drop(key)

    def drop(self, key: str) -> None:
        """Forget a copy (no-op for an unknown key); pending device buffers go once their gathers end."""
        with self._mu:
            self._copies.pop(key, None)

    def nbytes(self) -> int:
        with self._mu:
            return sum(c.nbytes for c in self._copies.values())

    def settle(self) -> None:
        """Every pending copy to host arrays; waits for those gathers, not for anything after them."""
        with self._mu:
            pending = [c for c in self._copies.values() if c.device is not None]
        for c in pending:
            c.settle()

    def num_programs(self, num_stages: int) -> int:
        """A gather and a scatter per bucket and stage."""
        return 2 * len(self.buckets) * num_stages

    def warmup(self, owner: Any, tick: Callable[[str], None]) -> None:
        """Compile every program a swap can run, by swapping the null page out and back in."""
        for size in self.buckets:
            tick(f"{owner.name} swap {size} pages")
            self.swap_out(owner, WARMUP_KEY, [NULL_PAGE] * size)
            self.swap_in(owner, WARMUP_KEY, [NULL_PAGE] * size)
