"""What the engine's workers, controller and KV paths need of an instance: the written contract that
the in-process :class:`~distllm_jax.engine.instance.Instance` and the cluster's
:class:`~distllm_jax.cluster.remote.RemoteInstance` (a Ray actor's stand-in) both implement, so a
worker never asks which one it holds."""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np

from distllm_jax.engine.config import InstanceSpec
from distllm_jax.engine.programs import HostStep, PendingStep, Segment
from distllm_jax.scheduling.protocols import Slot
from distllm_jax.shapes import StepKind


class InstanceAPI(Slot, Protocol):
    """An instance as the workers drive it: the scheduler's view (:class:`Slot`: name, role, pages,
    limits) plus the steps, health and KV reads. ``lookahead``: it can dispatch decode step k+1
    before step k's ids are read (``dispatch_decode``; one-stage instances in this process)."""

    spec: InstanceSpec
    num_pages: int
    steps: int
    prefix_cache: bool  # its allocator caches prompts' pages (and it compiled the mixed step they run as)

    @property
    def lookahead(self) -> bool: ...

    def run(self, kind: StepKind, micro_batches: Sequence[Sequence[Segment]]) -> list[HostStep]:
        """One step over its micro-batches; returns each one's sampled ids (and log-probabilities)."""

    def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy pages within its pool, ordered after the steps dispatched before."""

    # Preemption by swapping: a preempted request's pages go to host memory so that other requests
    # can have them, and come back later into whatever pages are free then.

    def swap_out(self, key: str, pages: Sequence[int]) -> None:
        """Start copying these pages (every layer) to host memory, kept under ``key``, without waiting
        for the device: ordered after the steps dispatched before (it reads what they wrote) and
        before anything dispatched later, so the caller frees and reuses the pages right away."""

    def swap_in(self, key: str, pages: Sequence[int]) -> None:
        """Write the copy kept under ``key`` into these pages (as many as were swapped out, else a
        ValueError; an unknown key is a KeyError), before any step dispatched later, and forget it:
        the request resumes decoding where it stopped."""

    def drop_swapped(self, key: str) -> None:
        """Forget the copy under ``key`` (its request ended while swapped out); no-op if none."""

    def swapped_bytes(self) -> int:
        """Host bytes held by swapped-out copies (stats: the host memory preemption is spending)."""

    def settle_swaps(self) -> None:
        """Turn pending swap-outs into host arrays and free their device buffers. The worker calls it
        once its next step is dispatched (lock not held), so the wait for the gathers overlaps that
        step instead of delaying its dispatch."""

    def warmup(self, tick: Callable[[str], None]) -> None:
        """Compile every program it can run."""

    def num_programs(self) -> int: ...

    def pools_ok(self) -> bool:
        """False when a failed step left its KV pool unusable."""

    def reset_pools(self) -> None:
        """Fresh pools after such a failure (its requests are failed by the caller)."""

    def host_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """All layers' K and V of these pages, on the host."""

    def describe(self) -> dict[str, Any]: ...


class LookaheadInstance(InstanceAPI, Protocol):
    """An instance whose ``lookahead`` is True (the worker's decode loop with a step in flight)."""

    def dispatch_decode(self, segs: Sequence[Segment], prev: PendingStep | None = None,
                        src: Sequence[int] | None = None) -> PendingStep:
        """Dispatch a decode step whose rows may take their input from ``prev``, a step not yet
        read; returns its results on the device without waiting."""
