"""The prefill instance's policy: FCFS batches up to the token budget (the paper's L_m).

A prefilled request keeps its K/V in the instance's pool (state HELD) until a decode instance pulls
it. The pool bounds that buffer: when it is full of held requests, new prompts wait in the queue
(never dropped), and prefill resumes as decode instances pull.
"""

from __future__ import annotations

from typing import Callable

from distllm_jax.scheduling.memory import KVManager, KVPolicy, RoomPlan
from distllm_jax.scheduling.pages import pages_for
from distllm_jax.scheduling.plans import PrefillPlan
from distllm_jax.scheduling.protocols import QueueState, RequestState, SchedRequest, Slot


def take_prompts(queues: QueueState, inst: Slot, *, budget: int, max_seqs: int,
                 tokens: Callable[[SchedRequest], int], now: float, room: int | None = None,
                 headroom: int = 0) -> list[SchedRequest]:
    """Pop waiting requests FCFS while they fit the token budget, the logits rows and the pool.

    The head of the queue is never skipped (FCFS); a prompt longer than the budget runs alone. Only
    requests routed here, or to no instance in particular, are taken (``route``: the FCFS order
    holds among them).
    ``tokens(r)``: what ``r``'s pages cover when it is admitted (its prefill, or its whole length on
    an instance that reserves); ``headroom``: pages the pool keeps free beyond them. A request of
    ``n`` samples takes ``n`` rows (``max_seqs``, ``room``), and its siblings take their pages here
    too: the prompt's full pages shared, their own for the rest.

    Where the instance caches prefixes, a request that starts anew (nothing computed, no pages)
    begins its table with the cached pages its prompt's leading pages match, and its prefill starts
    after them (``num_computed``). Its last prompt token is always computed: its logits sample the
    first token.
    """
    batch: list[SchedRequest] = []
    total = rows = 0
    limit = max_seqs if room is None else min(max_seqs, room)
    alloc = inst.alloc
    for r in queues.waiting:  # not changed until the loop ends
        if not routed_here(r, inst):
            continue  # another instance's (FCFS holds among those routed here)
        n = 1 + len(r.siblings)
        if rows + n > limit or (batch and total + r.num_prefill > budget):
            break
        need = tokens(r)
        shared = r.num_prompt // inst.page_size  # full prompt pages: never written after the prefill
        hashes = matchable_hashes(r, inst) if alloc.prefix_cache else []
        own = alloc.pages_needed_with_prefix(hashes, need) if hashes else alloc.extra_pages_needed(r.rid, need)
        extra = own + (n - 1) * (pages_for(need, inst.page_size) - shared)
        if extra + headroom > alloc.num_free:
            break
        if hashes:
            r.num_computed = alloc.ensure_with_prefix(r.rid, hashes, need) * inst.page_size
            r.timings.cached_prompt_tokens = r.num_computed
        else:
            alloc.ensure(r.rid, need)
            if alloc.prefix_cache:
                r.timings.cached_prompt_tokens = 0
        for q in (r, *r.siblings):
            if q is not r:
                alloc.share(r.rid, q.rid, shared)
                alloc.ensure(q.rid, need)
            q.holders.append(inst)
            q.state = RequestState.PREFILLING
            q.timings.prefill_start = now
            q.timings.prefill_instance = inst.name
        batch.append(r)
        total += r.num_prefill - r.num_computed
        rows += n
    taken = {id(r) for r in batch}
    while taken and id(queues.waiting[0]) in taken:  # the usual case: the batch is the queue's head
        taken.discard(id(queues.waiting.popleft()))
    for r in [q for q in queues.waiting if id(q) in taken]:
        queues.waiting.remove(r)
    return batch


def routed_here(r: SchedRequest, inst: Slot) -> bool:
    """``r`` may run on ``inst``: it was routed there, or to no instance in particular."""
    return r.route is None or r.route == inst.name


def waiting_here(queues: QueueState, inst: Slot) -> bool:
    """A waiting request may run on ``inst``."""
    return any(routed_here(r, inst) for r in queues.waiting)


def matchable_hashes(r: SchedRequest, inst: Slot) -> list[bytes]:
    """The page hashes ``r`` may start from: none once it computed or holds anything, and never the
    page of its last prefill token."""
    if r.num_computed or inst.alloc.has(r.rid):
        return []
    return list(r.prefix_hashes[: (r.num_prefill - 1) // inst.page_size])


class PrefillScheduler:
    def __init__(self, queues: QueueState, inst: Slot, budget: int):
        self.queues, self.inst, self.budget = queues, inst, budget
        self.running: list[SchedRequest] = []  # never decodes
        self.kv = KVManager(queues, inst, KVPolicy(watermark=0.0))  # a prompt's pages never grow here

    @property
    def load(self) -> int:
        return 0

    def has_work(self) -> bool:
        return waiting_here(self.queues, self.inst) and self.inst.alloc.num_free > 0

    def plan(self, now: float) -> PrefillPlan | None:
        batch = take_prompts(self.queues, self.inst, budget=self.budget, max_seqs=self.inst.max_prefill_seqs,
                             tokens=lambda r: r.num_prefill, now=now)
        return PrefillPlan(batch) if batch else None

    def make_room(self, need: Callable[[SchedRequest], int], can_preempt: bool = True) -> RoomPlan | None:
        return RoomPlan()  # nothing runs on here after its prefill

    def prefilled(self, r: SchedRequest) -> None:
        """``r``'s prefill is cached (``num_computed``) and its next token is out, and it goes on: its KV
        waits here for a pull."""
        r.state = RequestState.HELD
        self.queues.held.append(r)
