"""KV migration between instances: the decode side *pulls* a finished prefill's pages.

In one process the pull is three steps, each a compiled program or a runtime copy: gather the
request's pages on the prefill mesh into one contiguous buffer, ``jax.device_put`` it onto the decode
mesh's pool sharding (which reshards when the tensor-parallel degrees differ), and scatter it into the
decode pool (donated, so the update is in place). With pipeline stages on either side, each pair of
overlapping layer ranges moves separately. Page counts are bucketed (padding reads and writes the null
page), so the set of compiled programs stays bounded.

The puller works on *pool owners*: objects with ``stages`` (each with ``lo``, ``hi``, ``pool`` and
``buffer_sharding``, the sharding of a gathered ``[layers, pages, ...]`` buffer) and a ``lock`` held while dispatching anything that reads or donates their pools.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from distllm_jax.kv_cache import NULL_PAGE, KVPool
from distllm_jax.shapes import bucket, pow2_buckets


def gather_pages(pool: KVPool, pages: jax.Array, lo: int, hi: int) -> tuple[jax.Array, jax.Array]:
    """[hi-lo, n, page_size, kv_heads, head_dim] buffers holding the listed pages of layers [lo, hi)."""
    return (jnp.stack([pool.k[i][pages] for i in range(lo, hi)]),
            jnp.stack([pool.v[i][pages] for i in range(lo, hi)]))


def scatter_pages(pool: KVPool, pages: jax.Array, k: jax.Array, v: jax.Array, lo: int) -> tuple[KVPool, jax.Array]:
    """Write the buffers into layers [lo, lo + len(k)); the other layers pass through (aliased).
    Also returns one element read back from each written layer: ready once the writes are done, it
    can be waited for without holding the pool, which the owner's next step may donate meanwhile."""
    hi = lo + k.shape[0]
    upd = lambda arrs, buf: tuple(  # noqa: E731
        a.at[pages].set(buf[i - lo]) if lo <= i < hi else a for i, a in enumerate(arrs))
    new = KVPool(upd(pool.k, k), upd(pool.v, v))
    done = jnp.stack([new.k[i][pages[0], 0, 0, 0] + new.v[i][pages[0], 0, 0, 0] for i in range(lo, hi)])
    return new, done


# compiled once for every puller: in-process, the transfer server's, the cluster actors'
gather_pages_jit = jax.jit(gather_pages, static_argnames=("lo", "hi"))
scatter_pages_jit = jax.jit(scatter_pages, static_argnames=("lo",), donate_argnums=(0,))


def page_buckets(max_pages: int) -> list[int]:
    """Powers of two up to (and including) a bucket that covers ``max_pages``."""
    return list(pow2_buckets(1, max_pages))


def _overlaps(src: Any, dst: Any):
    for s in src.stages:
        for d in dst.stages:
            lo, hi = max(s.lo, d.lo), min(s.hi, d.hi)
            if lo < hi:
                yield s, d, lo, hi


class KVPuller(Protocol):
    """One migration path. ``kind`` names it in stats and request timings; ``buckets`` are the page
    counts it compiles a program for. ``pull`` returns when the pages are in place in the
    destination pool (with the path's name when one puller has several). ``staged``: it is also a
    :class:`StagedKVPuller`."""

    kind: str
    buckets: list[int]
    staged: bool

    def pull(self, src: Any, src_pages: Sequence[int], dst: Any, dst_pages: Sequence[int]) -> str | None: ...

    def warmup(self, src: Any, dst: Any, tick: Callable[[str], None]) -> None: ...


class StagedKVPuller(KVPuller, Protocol):
    """A puller that also splits a pull in two, :meth:`stage` (dispatch the gathers, return their
    buffers) and :meth:`put` (move and scatter them), so the prefill side can start a pull the
    moment its step ends, before its next step is dispatched."""

    def stage(self, src: Any, src_pages: Sequence[int], dst: Any) -> list: ...

    def put(self, staged: list, dst: Any, dst_pages: Sequence[int]) -> str | None: ...


class LocalKVPuller:
    """Both instances live in this process: device-to-device copies between their meshes."""

    kind = "local"
    staged = True

    def __init__(self, max_pages: int):
        self.buckets = page_buckets(max_pages)

    def pull(self, src: Any, src_pages: Sequence[int], dst: Any, dst_pages: Sequence[int]) -> None:
        """Copy ``src_pages`` of every layer of ``src`` into ``dst_pages`` of ``dst`` (in place)."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"page counts differ: {len(src_pages)} source, {len(dst_pages)} destination")
        self.put(self.stage(src, src_pages, dst), dst, dst_pages)

    def stage(self, src: Any, src_pages: Sequence[int], dst: Any) -> list:
        """The pull's first half: dispatch the gathers of ``src_pages`` (for ``dst``'s layer ranges)
        and return their buffers without waiting. The device runs them in dispatch order, so a
        gather dispatched before ``src``'s next step reads the pages before that step can delay it."""
        size = bucket(self.buckets, len(src_pages))
        staged = []
        for s, d, lo, hi in _overlaps(src, dst):
            with src.lock:
                k, v = gather_pages_jit(s.pool, page_index(src_pages, size, s.mesh), lo=lo - s.lo, hi=hi - s.lo)
            staged.append((d, lo, k, v, len(src_pages)))
        return staged

    def put(self, staged: list, dst: Any, dst_pages: Sequence[int]) -> None:
        """The second half: move the staged buffers onto ``dst``'s mesh and scatter them into
        ``dst_pages``; returns when they are in place. The scatters are dispatched without waiting
        for the buffers: in one process a gather fails only with its source's pool, whose own step
        fails with it (a buffer arriving from another process is waited for first:
        ``TransferKVReceiver.fetch``)."""
        done = []
        for d, lo, k, v, n in staged:
            if n != len(dst_pages):
                raise ValueError(f"page counts differ: {n} source, {len(dst_pages)} destination")
            k, v = jax.device_put((k, v), d.buffer_sharding)
            with dst.lock:
                d.pool, written = scatter_pages_jit(d.pool, page_index(dst_pages, k.shape[1], d.mesh), k, v, lo=lo - d.lo)
            done.append(written)
        jax.block_until_ready(done)

    def warmup(self, src: Any, dst: Any, tick: Callable[[str], None] = lambda _: None) -> None:
        warm_pulls(self, src, dst, tick)


def warm_pulls(puller: Any, src: Any, dst: Any, tick: Callable[[str], None]) -> None:
    """Compile a puller's programs for every page bucket by moving the null page onto itself."""
    for size in puller.buckets:
        tick(f"{puller.kind} {src.name}->{dst.name} {size} pages")
        puller.pull(src, [NULL_PAGE] * size, dst, [NULL_PAGE] * size)


def wait_pools(owner: Any) -> None:
    """Block until every pending write into ``owner``'s pools is done (only where nothing else may
    donate them meanwhile: a serving instance's pools change hands at every step)."""
    for st in owner.stages:
        jax.block_until_ready(st.pool)


def page_index(pages: Sequence[int], size: int, mesh: Any) -> jax.Array:
    """Page ids padded with the null page to a bucketed length, replicated on ``mesh``."""
    idx = np.full(size, NULL_PAGE, np.int32)
    idx[: len(pages)] = pages
    return jax.device_put(idx, NamedSharding(mesh, PartitionSpec()))


def read_host_pages(owner: Any, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """All layers' K and V of the listed pages of a pool owner in this process, on the host (stages
    concatenated in layer order): what :meth:`Instance.host_pages` returns."""
    idx = np.asarray(pages, np.int32)
    with owner.lock:
        # whole pools to the host, then index: no eager device op, so no compilation per page count
        parts = [(np.stack([np.asarray(a)[idx] for a in st.pool.k]), np.stack([np.asarray(a)[idx] for a in st.pool.v]))
                 for st in owner.stages]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def pages_equal(a: Any, a_pages: Sequence[int], b: Any, b_pages: Sequence[int]) -> bool:
    """Bit-for-bit comparison of a request's pages in two pool owners."""
    for x, y in zip(a.host_pages(a_pages), b.host_pages(b_pages)):
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True
