"""The decode instance's policy: pull prefilled requests when there is room, then continuous batching.

Two ways to admit (:class:`Admission`):

- ``RESERVE`` (this engine): a request is pulled only when this instance has a batch slot and pages
  for its whole possible length (prompt + max_tokens, capped by the context), so the running batch
  never runs out of pages.
- ``ON_DEMAND`` (DistServe's decoding stage, ``decoding_stage_scheduler.py``): a request is pulled
  when the pages for what it has cached fit; a running sequence takes a page as it crosses a page
  boundary, and when a step would run out the newest running requests are swapped out (their KV
  leaves the pool) until the rest fit. Swapped requests come back first, oldest first, before any
  new pull. The engine's workers do not execute swaps yet: only the simulator runs this mode.

With several decode instances a request goes to the least-loaded one that has room: each instance
defers to a peer with a smaller load.
"""

from __future__ import annotations

import collections
import enum
from typing import Callable, Iterable

from distllm_jax.scheduling.pages import pages_for
from distllm_jax.scheduling.plans import DecodePlan, PullPlan
from distllm_jax.scheduling.protocols import QueueState, RequestState, SchedRequest, Slot


class Admission(enum.Enum):
    RESERVE = "reserve"
    ON_DEMAND = "on-demand"


class DecodeScheduler:
    def __init__(self, queues: QueueState, inst: Slot, peers: Iterable["DecodeScheduler"],
                 lost: Callable[[], bool] = lambda: False, admission: Admission = Admission.RESERVE):
        """``peers``: every decode scheduler (this one included), shared and filled in by the caller.
        ``lost``: whether the instance is gone (nothing is routed to a lost instance)."""
        self.queues, self.inst, self.peers, self.lost = queues, inst, peers, lost
        self.admission = admission
        self.running: list[SchedRequest] = []  # in the decode batch
        self.pulling = 0  # chosen and not yet in the batch (counted against the room)
        self.swapped: collections.deque[SchedRequest] = collections.deque()  # ON_DEMAND: out of the pool, oldest first
        self.swaps = 0  # swap-outs so far

    @property
    def load(self) -> int:
        return len(self.running) + self.pulling + len(self.swapped)

    def _need(self, r: SchedRequest) -> int:
        """Tokens of pages ``r`` holds here: its whole length, or what is cached plus the next token."""
        return r.max_cached if self.admission is Admission.RESERVE else min(r.num_computed + 1, r.max_cached)

    def has_room(self) -> bool:
        return self.load < self.inst.max_batch and self.inst.alloc.num_free > 0 and not self.lost()

    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.queues.held) and self.has_room())

    def fits(self, r: SchedRequest) -> bool:
        return self.inst.alloc.extra_pages_needed(r.rid, self._need(r)) <= self.inst.alloc.num_free

    def choose_pulls(self, now: float) -> list[PullPlan]:
        """Held requests this instance pulls now, FCFS, with their pages reserved here."""
        out = []
        while self.queues.held and self.has_room() and not self.swapped:
            r = self.queues.held[0]
            if not self.fits(r):
                break
            others = [p.load for p in self.peers if p is not self and p.has_room() and p.fits(r)]
            if others and self.load > min(others):
                break  # a less-loaded peer takes it
            self.queues.held.popleft()
            self.inst.alloc.ensure(r.rid, self._need(r))
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

    def plan(self) -> DecodePlan | None:
        """The next decode step's batch; ON_DEMAND first brings swapped requests back while their
        pages fit, then gives every running sequence the page its next token needs, swapping out
        the newest while the pool is short."""
        if self.admission is Admission.ON_DEMAND:
            self._swap_in()
            self._grow()
        return DecodePlan(list(self.running)) if self.running else None

    def _swap_in(self) -> None:
        alloc = self.inst.alloc
        while self.swapped and alloc.extra_pages_needed(self.swapped[0].rid, self._need(self.swapped[0])) <= alloc.num_free:
            r = self.swapped.popleft()
            alloc.ensure(r.rid, self._need(r))
            r.state = RequestState.RUNNING
            self.running.append(r)

    def _grow(self) -> None:
        alloc, i = self.inst.alloc, 0
        while i < len(self.running):
            r = self.running[i]
            while alloc.extra_pages_needed(r.rid, self._need(r)) > alloc.num_free:
                victim = self.running.pop()  # the newest
                alloc.free(victim.rid)
                victim.state = RequestState.SWAPPED
                self.swapped.appendleft(victim)  # ahead of those swapped before it: oldest first
                self.swaps += 1
                if victim is r:
                    break
            else:
                alloc.ensure(r.rid, self._need(r))
                i += 1
