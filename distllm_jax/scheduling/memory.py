"""How an instance's KV pages are handed out: admission by what a request uses, growth as its
sequence crosses page boundaries, and preemption when a step would run out (vLLM's way, which
DistServe's decoding stage follows too).

- ``ON_DEMAND`` admits a request by the pages it needs *now* (its prompt, or what it has cached and
  its next token) while a watermark of the pool stays free for the running sequences to grow into.
  Before each decode step every running sequence takes the page its next token needs; when the pool
  is short, the newest running request is preempted until the rest fit:

  - ``RECOMPUTE`` frees its pages and puts it at the head of the waiting queue. Its prefill is redone
    over its prompt and every token it has sampled, and samples its next token; nothing it streamed is
    sent again.
  - ``SWAP`` copies its pages to host memory (the worker executes the :class:`SwapOp`) and frees them;
    swapped requests come back first, oldest first, before any new request is admitted.

- ``RESERVE`` takes pages for a request's whole possible length (prompt + ``max_tokens``, capped by
  the context) when it joins, so a running batch never grows and never preempts, at the cost of
  admitting fewer requests.

Pure Python: the engine's workers execute the :class:`RoomPlan` (swap copies) and the simulator
times it, both through the same :class:`KVManager`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from typing import Callable

from distllm_jax.scheduling.pages import pages_for
from distllm_jax.scheduling.protocols import QueueState, RequestState, SchedRequest, Slot


class Admission(enum.Enum):
    RESERVE = "reserve"
    ON_DEMAND = "on-demand"


class Preemption(enum.StrEnum):
    RECOMPUTE = "recompute"
    SWAP = "swap"


@dataclasses.dataclass(frozen=True)
class KVPolicy:
    """``watermark``: the share of the pool that admission leaves free while the instance has running
    sequences (vLLM's default is 1 %), so that growth does not preempt as soon as a request joins."""

    admission: Admission = Admission.ON_DEMAND
    preemption: Preemption = Preemption.RECOMPUTE
    watermark: float = 0.01

    @classmethod
    def of(cls, admission: str, preemption: str = "recompute", watermark: float = 0.01) -> "KVPolicy":
        """From the engine's or the simulator's config strings."""
        return cls(Admission(admission), Preemption(preemption), watermark)


@dataclasses.dataclass
class SwapOp:
    """Copy ``req``'s KV between ``pages`` of the pool and host memory (``out``: to the host)."""

    req: SchedRequest
    pages: list[int]
    out: bool


@dataclasses.dataclass
class RoomPlan:
    """What making room for a step decided, for the worker to execute before that step: the swap
    copies in order, and the requests preempted for recompute (already back in the waiting queue)."""

    swaps: list[SwapOp] = dataclasses.field(default_factory=list)
    recompute: list[SchedRequest] = dataclasses.field(default_factory=list)
    grown: int = 0  # pages the running sequences took


class KVManager:
    """One instance's pages under a :class:`KVPolicy`: what admission checks, and the room a decode
    step needs. Counts what it did (``preemptions`` by kind, ``grown`` pages) for stats."""

    def __init__(self, queues: QueueState, inst: Slot, policy: KVPolicy):
        self.queues, self.inst, self.policy = queues, inst, policy
        self.swapped: collections.deque[SchedRequest] = collections.deque()  # out of the pool, oldest first
        self.preemptions: collections.Counter[Preemption] = collections.Counter()
        self.grown = 0
        self.prompt_tokens = 0  # prompt tokens of the prefills done here
        self.cached_tokens = 0  # of those, the ones served from cached pages

    @property
    def on_demand(self) -> bool:
        return self.policy.admission is Admission.ON_DEMAND

    def prompt_cached(self, r: SchedRequest) -> None:
        """``r``'s prefill is done: its full prompt pages hold their KV, so a prefix cache names them
        for later prompts (a no-op where the allocator caches nothing), and the hit is counted."""
        self.inst.alloc.register(r.rid, list(r.prefix_hashes[: r.num_prompt // self.inst.page_size]))
        self.prompt_tokens += r.num_prompt
        self.cached_tokens += r.timings.cached_prompt_tokens

    def headroom(self, busy: bool) -> int:
        """Pages admission leaves free: the watermark while sequences run here (``busy``), none on an
        idle instance (a request that needs nearly the whole pool still runs, alone)."""
        if not (self.on_demand and busy):
            return 0
        return math.ceil(self.policy.watermark * self.inst.alloc.capacity)

    def prefill_tokens(self, r: SchedRequest) -> int:
        """Tokens of pages a prefill of ``r`` takes on an instance that decodes it too."""
        return r.num_prefill if self.on_demand else r.max_cached

    def pull_tokens(self, r: SchedRequest) -> int:
        """Tokens of pages a decode instance takes when it pulls ``r``: what it has cached and its next
        token (on demand), or its whole possible length."""
        return min(r.num_computed + 1, r.max_cached) if self.on_demand else r.max_cached

    def fits(self, r: SchedRequest, tokens: int, busy: bool) -> bool:
        """``r`` can be admitted with pages for ``tokens``: no swapped request waits to come back first,
        and the pool keeps its headroom."""
        alloc = self.inst.alloc
        return not self.swapped and alloc.extra_pages_needed(r.rid, tokens) + self.headroom(busy) <= alloc.num_free

    def make_room(self, running: list[SchedRequest], need: Callable[[SchedRequest], int],
                  can_preempt: bool = True) -> RoomPlan | None:
        """Pages for every running request's next step (``need(r)``: the tokens its pages must cover).

        Swapped requests come back first (oldest first) while they fit beside the running ones' growth
        and the headroom. When the growth alone does not fit, the newest running requests are preempted
        until it does; None, with nothing changed, when that is needed and ``can_preempt`` is False (the
        caller first finishes the step in flight, which may still write the victims' pages)."""
        if not self.on_demand:
            return RoomPlan()
        alloc = self.inst.alloc
        want = lambda r: min(need(r), r.max_cached)  # noqa: E731
        growth = sum(alloc.extra_pages_needed(r.rid, want(r)) for r in running)
        plan = RoomPlan()
        if growth > alloc.num_free:
            if not can_preempt:
                return None
            self._grow_preempting(running, want, plan)
            return plan
        while self.swapped and len(running) < self.inst.max_batch:
            r = self.swapped[0]
            if r.state is RequestState.DONE:
                self.swapped.popleft()
                continue
            back = alloc.extra_pages_needed(r.rid, want(r))
            if growth + back + self.headroom(bool(running)) > alloc.num_free:
                break
            self.swapped.popleft()
            table = alloc.ensure(r.rid, want(r))
            plan.swaps.append(SwapOp(r, list(table[: pages_for(r.num_computed, self.inst.page_size)]), out=False))
            r.state = RequestState.RUNNING
            running.append(r)
            plan.grown += back
        for r in running:
            plan.grown += alloc.extra_pages_needed(r.rid, want(r))
            alloc.ensure(r.rid, want(r))
        self.grown += plan.grown
        return plan

    def _grow_preempting(self, running: list[SchedRequest], want: Callable[[SchedRequest], int],
                         plan: RoomPlan) -> None:
        alloc, i = self.inst.alloc, 0
        while i < len(running):
            r = running[i]
            while alloc.extra_pages_needed(r.rid, want(r)) > alloc.num_free:
                victim = running.pop()  # the newest
                self._preempt(victim, plan)
                if victim is r:
                    break
            else:
                plan.grown += alloc.extra_pages_needed(r.rid, want(r))
                alloc.ensure(r.rid, want(r))
                i += 1
        self.grown += plan.grown

    def _preempt(self, r: SchedRequest, plan: RoomPlan) -> None:
        alloc, kind = self.inst.alloc, self.policy.preemption
        self.preemptions[kind] += 1
        if kind is Preemption.SWAP:
            pages = list(alloc.table(r.rid)[: pages_for(r.num_computed, self.inst.page_size)])
            plan.swaps.append(SwapOp(r, pages, out=True))
            alloc.free(r.rid)
            r.state = RequestState.SWAPPED
            self.swapped.appendleft(r)  # ahead of those swapped before it (newer): oldest first
            return
        alloc.free(r.rid)
        if self.inst in r.holders:
            r.holders.remove(self.inst)
        r.state = RequestState.WAITING
        r.num_computed = 0
        self.queues.waiting.appendleft(r)  # ahead of new work, and of those preempted before it (newer)
        plan.recompute.append(r)
