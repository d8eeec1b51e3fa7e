"""The decode instance's policy: pull prefilled requests when there is room, then continuous batching.

Pages are managed by the instance's :class:`~distllm_jax.scheduling.memory.KVPolicy`: on demand (as
DistServe's decoding stage and vLLM do), a request is pulled when the pages for what it has cached
and its next token fit beside the watermark, its sequence grows page by page, and the newest running
requests are preempted when a step would run out (swapped out to host memory, or sent back to the
prefill queue to be recomputed). Swapped requests come back first, oldest first, before any new pull.
With ``RESERVE`` a request is pulled only with pages for its whole possible length.

With several decode instances a request goes to the least-loaded one that has room: each instance
defers to a peer with a smaller load.
"""

from __future__ import annotations

from typing import Callable, Iterable

from distllm_jax.scheduling.memory import KVManager, KVPolicy, RoomPlan
from distllm_jax.scheduling.pages import pages_for
from distllm_jax.scheduling.plans import DecodePlan, PullPlan
from distllm_jax.scheduling.protocols import QueueState, RequestState, SchedRequest, Slot


class DecodeScheduler:
    def __init__(self, queues: QueueState, inst: Slot, peers: Iterable["DecodeScheduler"],
                 lost: Callable[[], bool] = lambda: False, policy: KVPolicy | None = None):
        """``peers``: every decode scheduler (this one included), shared and filled in by the caller.
        ``lost``: whether the instance is gone (nothing is routed to a lost instance)."""
        self.queues, self.inst, self.peers, self.lost = queues, inst, peers, lost
        self.kv = KVManager(queues, inst, policy or KVPolicy())
        self.running: list[SchedRequest] = []  # in the decode batch
        self.pulling = 0  # chosen and not yet in the batch (counted against the room)

    @property
    def load(self) -> int:
        return len(self.running) + self.pulling + len(self.kv.swapped)

    def has_room(self) -> bool:
        return self.load < self.inst.max_batch and self.inst.alloc.num_free > 0 and not self.lost()

    def has_work(self) -> bool:
        return bool(self.running or self.kv.swapped) or (bool(self.queues.held) and self.has_room())

    def fits(self, r: SchedRequest) -> bool:
        return self.kv.fits(r, self.kv.pull_tokens(r), busy=bool(self.running or self.pulling))

    def choose_pulls(self, now: float) -> list[PullPlan]:
        """Held requests this instance pulls now, FCFS, with their pages reserved here."""
        out = []
        while self.queues.held and self.has_room():  # fits(): none while a swapped request waits
            r = self.queues.held[0]
            if not self.fits(r):
                break
            others = [p.load for p in self.peers if p is not self and p.has_room() and p.fits(r)]
            if others and self.load > min(others):
                break  # a less-loaded peer takes it
            self.queues.held.popleft()
            self.inst.alloc.ensure(r.rid, self.kv.pull_tokens(r))
            r.holders.append(self.inst)
            r.state = RequestState.MIGRATING
            r.timings.migration_start = now
            r.timings.decode_instance = self.inst.name
            n = pages_for(r.num_computed, self.inst.page_size)
            src = r.holders[0]
            out.append(PullPlan(r, src, list(src.alloc.table(r.rid))[:n], list(self.inst.alloc.table(r.rid))[:n]))
            self.pulling += 1
        return out

    def pull_ended(self) -> None:
        """A chosen pull is over (landed or failed): it no longer counts against the room."""
        self.pulling -= 1

    def pulled(self, r: SchedRequest, src: Slot) -> bool:
        """``r``'s pages are in place here: free them at the source and join the batch. False when
        ``r`` was taken elsewhere meanwhile (cancelled, failed, its source lost and the prefill redone)."""
        self.pull_ended()
        if not (r.state is RequestState.MIGRATING and self.inst in r.holders and src in r.holders):
            return False
        src.alloc.free(r.rid)
        r.holders.remove(src)
        r.state = RequestState.RUNNING
        self.running.append(r)
        return True

    def make_room(self, need: Callable[[SchedRequest], int], can_preempt: bool = True) -> RoomPlan | None:
        return self.kv.make_room(self.running, need, can_preempt)

    def plan(self) -> DecodePlan | None:
        """The next decode step's batch (its room made first: :meth:`make_room`)."""
        return DecodePlan(list(self.running)) if self.running else None
