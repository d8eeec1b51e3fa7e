"""The prefill instance's policy: FCFS batches up to the token budget (the paper's L_m).

A prefilled request keeps its K/V in this instance's pool (state HELD) until a decode instance pulls
it. The pool is the bound on that buffer: when it is full of held requests, new prompts wait in the
queue (they are never dropped), and prefill resumes as decode instances pull.
"""

from __future__ import annotations

import time

from distllm_jax.engine.controller import Controller
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.programs import Segment
from distllm_jax.engine.request import Request, RequestState
from distllm_jax.engine.worker import Worker, mine


def take_prompts(ctrl: Controller, inst: Instance, budget: int, max_seqs: int, reserve_all: bool,
                 now: float, room: int | None = None) -> list[Request]:
    """Pop waiting requests FCFS while they fit the token budget, the sequence limit and the pool.

    The head of the queue is never skipped (FCFS); a prompt longer than the budget runs alone.
    ``reserve_all`` reserves pages for the request's whole length (instances that also decode).
    """
    batch: list[Request] = []
    tokens = 0
    limit = max_seqs if room is None else min(max_seqs, room)
    while ctrl.waiting and len(batch) < limit:
        r = ctrl.waiting[0]
        if batch and tokens + r.num_prompt > budget:
            break
        need = r.max_cached if reserve_all else r.num_prompt
        if inst.alloc.extra_pages_needed(r.rid, need) > inst.alloc.num_free:
            break
        ctrl.waiting.popleft()
        inst.alloc.ensure(r.rid, need)
        r.holders.append(inst)
        r.state = RequestState.PREFILLING
        r.timings.prefill_start = now
        r.timings.prefill_instance = inst.name
        batch.append(r)
        tokens += r.num_prompt
    return batch


class PrefillWorker(Worker):
    def __init__(self, ctrl: Controller, inst: Instance, budget: int):
        super().__init__(ctrl, inst)
        self.budget = budget
        self.lookahead = False  # never runs decode steps

    def has_work(self) -> bool:
        return bool(self.ctrl.waiting) and self.inst.alloc.num_free > 0 and not self.lost

    def step(self) -> bool:
        with self.ctrl.cv:
            if self.lost:
                return False
            now = time.perf_counter()
            self.ctrl.expire_queued(now)
            batch = take_prompts(self.ctrl, self.inst, self.budget, self.inst.max_prefill_seqs, False, now)
            segs = [Segment(r.prompt, 0, list(self.inst.alloc.table(r.rid)), r.params, r.seed) for r in batch]
        if not batch:
            return False
        tokens = self.run("prefill", batch, segs)
        if tokens is None:
            return True
        with self.ctrl.cv:
            now = time.perf_counter()
            for r, tok in zip(batch, tokens):
                if mine(r, self.inst, RequestState.PREFILLING) and self.first_token(r, tok, now):
                    r.state = RequestState.HELD  # KV stays here until a decode instance pulls it
                    self.ctrl.held.append(r)
            self.ctrl.cv.notify_all()
        return True
