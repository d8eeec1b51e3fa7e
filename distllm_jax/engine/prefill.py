"""The prefill instance's worker: it runs :class:`~distllm_jax.scheduling.PrefillScheduler`'s batches.

As a batch ends, the decode instances with room choose their pulls at once and this worker
dispatches those pulls' gathers before its next batch: otherwise they would queue behind that whole
step on the device.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Sequence

from distllm_jax.engine.controller import Controller
from distllm_jax.engine.instance_api import InstanceAPI
from distllm_jax.engine.request import RequestState
from distllm_jax.engine.worker import Worker, still_here
from distllm_jax.scheduling import PrefillScheduler

if TYPE_CHECKING:
    from distllm_jax.engine.decode import DecodeWorker


class PrefillWorker(Worker):
    def __init__(self, ctrl: Controller, inst: InstanceAPI, budget: int, decoders: Sequence["DecodeWorker"] = ()):
        """``decoders``: the decode workers (filled in by the engine, shared), offered each batch as
        it ends so their pulls' gathers go ahead of this instance's next step."""
        super().__init__(ctrl, inst, PrefillScheduler(ctrl, inst, budget))
        self.decoders = decoders

    def has_work(self) -> bool:
        return self.sched.has_work() and not self.lost

    def step(self) -> bool:
        with self.ctrl.lock:
            if self.lost:
                return False
            now = time.perf_counter()
            self.ctrl.expire_queued(now)
            plan = self.sched.plan(now)
            if plan is None:
                return False
            batch = plan.batch
            kind, segs = self.prompt_segments(batch)
        out = self.run(kind, batch, segs)
        if out is None:
            return True
        with self.ctrl.lock:
            now = time.perf_counter()
            for r, rows, lps in zip(batch, out.rows, out.prompt_logprobs):
                if still_here(r, self.inst, RequestState.PREFILLING):
                    for q in self.prompt_done(r, rows, lps, now):
                        self.sched.prefilled(q)  # KV stays here until a decode instance pulls it
            # decode instances with room choose now, least loaded first (their own policy)
            offers = [(w, w.offer(now)) for w in sorted(self.decoders, key=lambda w: w.load)]
            self.ctrl.lock.notify_all()
        for w, jobs in offers:
            w.stage(jobs)  # dispatched before this instance's next step
        return True
