"""The colocated baselines' workers, running :class:`~distllm_jax.scheduling.ColocatedScheduler`
(vLLM-style, prefill first) and :class:`~distllm_jax.scheduling.ChunkedScheduler` (SplitFuse-style
mixed steps) in the same engine, so every comparison is side by side."""

from __future__ import annotations

import time

from distllm_jax.engine.controller import Controller
from distllm_jax.engine.instance_api import InstanceAPI
from distllm_jax.engine.request import RequestState
from distllm_jax.engine.worker import Worker
from distllm_jax.scheduling import ChunkedScheduler, ColocatedScheduler, KVPolicy, PrefillPlan
from distllm_jax.shapes import StepKind


class ColocatedWorker(Worker):
    def __init__(self, ctrl: Controller, inst: InstanceAPI, budget: int, policy: KVPolicy | None = None):
        super().__init__(ctrl, inst, ColocatedScheduler(ctrl, inst, budget, policy))

    def step(self) -> bool:
        with self.ctrl.lock:
            now = time.perf_counter()
            self.ctrl.expire_queued(now)
            self.drop_finished(now)
            plan = self.sched.plan(now)
            if not isinstance(plan, PrefillPlan):
                batch = None
            else:
                batch = plan.batch
                kind, segs = self.prompt_segments(batch)
        if batch is None:
            return self.decode_step()
        self.flush()  # the decode step in flight streams its tokens before the prefill runs
        out = self.run(kind, batch, segs)
        if out is not None:
            with self.ctrl.lock:
                now = time.perf_counter()
                for r, rows, lps in zip(batch, out.rows, out.prompt_logprobs):
                    if r.state is not RequestState.DONE:
                        for q in self.prompt_done(r, rows, lps, now):
                            self.sched.prefilled(q)
        return True


class ChunkedWorker(Worker):
    def __init__(self, ctrl: Controller, inst: InstanceAPI, budget: int, policy: KVPolicy | None = None):
        super().__init__(ctrl, inst, ChunkedScheduler(ctrl, inst, budget, policy))

    def step(self) -> bool:
        with self.ctrl.lock:
            now = time.perf_counter()
            self.ctrl.expire_queued(now)
            self.drop_finished(now)
            for r in list(self.sched.prefilling):
                if r.state is RequestState.DONE or self.ctrl.drop_if_over(r, now):
                    self.sched.prefilling.remove(r)
            self.make_room(lambda r: r.num_computed + 1)
            plan = self.sched.plan(now)
            if plan is None:
                return False
            reqs = [row.req for row in plan.rows]
            segs = [self.prompt_segment(row.req, row.start, row.length) if row.chunk else self.decode_segment(row.req)
                    for row in plan.rows]
        out = self.run(StepKind.MIXED, reqs, segs)
        self.settle_swaps()
        if out is None:
            self.sched.prefilling = [r for r in self.sched.prefilling if r.state is not RequestState.DONE]
            return True
        with self.ctrl.lock:
            now = time.perf_counter()
            decoded = [(row.req, rows) for row, rows in zip(plan.rows, out.rows) if not row.chunk]
            self.after_decode([r for r, _ in decoded], [rows for _, rows in decoded], now)
            for row, rows, lps in zip(plan.rows, out.rows, out.prompt_logprobs):
                r = row.req
                if not row.chunk or r not in self.sched.prefilling:
                    continue
                if r.state is RequestState.DONE:
                    self.sched.prefilling.remove(r)
                    continue
                if not self.sched.chunk_done(r, row.length):
                    r.prompt_logprobs += lps
                    continue
                for q in self.prompt_done(r, rows, lps, now):
                    self.sched.prefilled(q)
        return True
