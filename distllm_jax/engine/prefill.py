"""The prefill instance's policy: FCFS batches up to the token budget (the paper's L_m).

A prefilled request keeps its K/V in this instance's pool (state HELD) until a decode instance pulls
it. As a batch ends, the decode instances with room choose their pulls at once and this worker
dispatches those pulls' gathers before its next batch: otherwise they would queue behind that whole
step on the device. The pool is the bound on that buffer: when it is full of held requests, new
prompts wait in the queue (they are never dropped), and prefill resumes as decode instances pull.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

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
    def __init__(self, ctrl: Controller, inst: Instance, budget: int, decoders: Sequence[Any] = ()):
        """``decoders``: the decode workers (filled in by the engine, shared), offered each batch as
        it ends so their pulls' gathers go ahead of this instance's next step."""
        super().__init__(ctrl, inst)
        self.budget = budget
        self.decoders = decoders
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
            # decode instances with room choose now, least loaded first (their own policy)
            offers = [(w, w.offer(now)) for w in sorted(self.decoders, key=lambda w: w.load)]
            self.ctrl.cv.notify_all()
        for w, jobs in offers:
            w.stage(jobs)  # dispatched before this instance's next step
        return True
