"""The colocated baselines, in the same engine so every comparison is side by side.

- :class:`ColocatedWorker` (vLLM-style): one instance runs both phases; whenever waiting prompts fit,
  a prefill step runs first (prefill-prioritised), otherwise one decode step over the running batch.
- :class:`ChunkedWorker` (DeepSpeed-MII / SplitFuse-style): every step mixes one token of each running
  request with chunks of waiting prompts, up to the token budget; a long prompt spans several steps.

Both reserve pages for a request's whole possible length when they admit it, as the decode instance
of the disaggregated mode does.
"""

from __future__ import annotations

import time

from distllm_jax.engine.controller import Controller
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.prefill import take_prompts
from distllm_jax.engine.programs import Segment
from distllm_jax.engine.request import Request, RequestState
from distllm_jax.engine.worker import Worker


class ColocatedWorker(Worker):
    def __init__(self, ctrl: Controller, inst: Instance, budget: int):
        super().__init__(ctrl, inst)
        self.budget = budget

    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.ctrl.waiting) and len(self.running) < self.inst.max_batch)

    def step(self) -> bool:
        with self.ctrl.cv:
            now = time.perf_counter()
            self.ctrl.expire_queued(now)
            self.drop_finished(now)
            room = self.inst.max_batch - len(self.running)
            batch = take_prompts(self.ctrl, self.inst, self.budget, self.inst.max_prefill_seqs, True, now, room)
            segs = [Segment(r.prompt, 0, list(self.inst.alloc.table(r.rid)), r.params, r.seed) for r in batch]
        if not batch:
            return self.decode_step()
        self.flush()  # the decode step in flight streams its tokens before the prefill runs
        tokens = self.run("prefill", batch, segs)
        if tokens is not None:
            with self.ctrl.cv:
                now = time.perf_counter()
                for r, tok in zip(batch, tokens):
                    if r.state is not RequestState.DONE and self.first_token(r, tok, now):
                        r.state = RequestState.RUNNING
                        self.running.append(r)
        return True


class ChunkedWorker(Worker):
    def __init__(self, ctrl: Controller, inst: Instance, budget: int):
        super().__init__(ctrl, inst)
        self.budget = budget
        self.lookahead = False  # its steps mix prompt chunks with decode tokens: no plain decode step
        self.prefilling: list[Request] = []  # admitted, prompt partly computed (FCFS)

    @property
    def load(self) -> int:
        return len(self.running) + len(self.prefilling)

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling) or (bool(self.ctrl.waiting) and self.load < self.inst.max_batch)

    def _plan(self, now: float) -> tuple[list[Request], list[Segment]]:
        self.ctrl.expire_queued(now)
        self.drop_finished(now)
        for r in list(self.prefilling):
            if r.state is RequestState.DONE or self.ctrl.drop_if_over(r, now):
                self.prefilling.remove(r)
        reqs = list(self.running)
        segs = [self.decode_segment(r) for r in reqs]
        left, i = self.budget - len(segs), 0
        while left > 0:
            if i == len(self.prefilling):  # every admitted prompt has its chunk: admit the next, FCFS
                if not self.ctrl.waiting or self.load >= self.inst.max_batch:
                    break
                admitted = take_prompts(self.ctrl, self.inst, 0, 1, True, now)
                if not admitted:
                    break
                self.prefilling += admitted
            r = self.prefilling[i]
            n = min(left, r.num_prompt - r.num_computed)
            chunk = r.prompt[r.num_computed : r.num_computed + n]
            segs.append(Segment(chunk, r.num_computed, list(self.inst.alloc.table(r.rid)), r.params, r.seed))
            reqs.append(r)
            left -= n
            i += 1
        return reqs, segs

    def step(self) -> bool:
        with self.ctrl.cv:
            reqs, segs = self._plan(time.perf_counter())
        if not segs:
            return False
        tokens = self.run("mixed", reqs, segs)
        if tokens is None:
            self.prefilling = [r for r in self.prefilling if r.state is not RequestState.DONE]
            return True
        with self.ctrl.cv:
            now = time.perf_counter()
            decoded = [(r, t) for r, t in zip(reqs, tokens) if r in self.running]
            self.after_decode([r for r, _ in decoded], [t for _, t in decoded], now)
            for r, seg, tok in zip(reqs, segs, tokens):
                if r not in self.prefilling:
                    continue
                if r.state is RequestState.DONE:
                    self.prefilling.remove(r)
                    continue
                r.num_computed += len(seg.tokens)
                if r.num_computed < r.num_prompt:
                    continue  # more chunks to go; this step's sample is not a real token
                self.prefilling.remove(r)
                if self.first_token(r, tok, now):
                    r.state = RequestState.RUNNING
                    self.running.append(r)
        return True
