"""The colocated baselines' policies, so every comparison runs in the same engine.

- :class:`ColocatedScheduler` (vLLM-style): one instance runs both phases; whenever waiting prompts
  fit, a prefill step runs first (prefill-prioritised), otherwise one decode step over the batch.
- :class:`ChunkedScheduler` (DeepSpeed-MII / SplitFuse-style): every step mixes one token of each
  running request with chunks of waiting prompts, up to the token budget; a long prompt spans steps.

Both reserve pages for a request's whole possible length when they admit it, as the disaggregated
decode instance does.
"""

from __future__ import annotations

from distllm_jax.scheduling.plans import DecodePlan, MixedPlan, MixedRow, PrefillPlan
from distllm_jax.scheduling.prefill import take_prompts
from distllm_jax.scheduling.protocols import QueueState, RequestState, SchedRequest, Slot


class ColocatedScheduler:
    def __init__(self, queues: QueueState, inst: Slot, budget: int):
        self.queues, self.inst, self.budget = queues, inst, budget
        self.running: list[SchedRequest] = []

    @property
    def load(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.queues.waiting) and len(self.running) < self.inst.max_batch)

    def plan(self, now: float) -> PrefillPlan | DecodePlan | None:
        room = self.inst.max_batch - len(self.running)
        batch = take_prompts(self.queues, self.inst, budget=self.budget, max_seqs=self.inst.max_prefill_seqs,
                             reserve_all=True, now=now, room=room)
        if batch:
            return PrefillPlan(batch)
        return DecodePlan(list(self.running)) if self.running else None

    def prefilled(self, r: SchedRequest) -> None:
        """``r``'s first token is out and it goes on: it joins the decode batch."""
        r.num_computed = r.num_prompt
        r.state = RequestState.RUNNING
        self.running.append(r)


class ChunkedScheduler:
    def __init__(self, queues: QueueState, inst: Slot, budget: int):
        self.queues, self.inst, self.budget = queues, inst, budget
        self.running: list[SchedRequest] = []
        self.prefilling: list[SchedRequest] = []  # admitted, prompt partly computed (FCFS)

    @property
    def load(self) -> int:
        """Decode rows, now and once the admitted prompts are in (each of their samples is one)."""
        return len(self.running) + sum(1 + len(r.siblings) for r in self.prefilling)

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling) or (bool(self.queues.waiting) and self.load < self.inst.max_batch)

    def plan(self, now: float) -> MixedPlan | None:
        """One decode row per running request, then prompt chunks FCFS until the budget is spent
        (the next waiting prompt is admitted only when every admitted one has its chunk)."""
        rows = [MixedRow(r, r.num_computed, 1, False) for r in self.running]
        left, i = self.budget - len(rows), 0
        while left > 0:
            if i == len(self.prefilling):
                if not self.queues.waiting or self.load >= self.inst.max_batch:
                    break
                # one prompt at a time, its pages reserved whole: its chunks run over several steps
                # (budget 0: the first prompt only)
                admitted = take_prompts(self.queues, self.inst, budget=0, max_seqs=self.inst.max_batch,
                                        reserve_all=True, now=now, room=self.inst.max_batch - self.load)
                if not admitted:
                    break
                self.prefilling += admitted
            r = self.prefilling[i]
            n = min(left, r.num_prompt - r.num_computed)
            rows.append(MixedRow(r, r.num_computed, n, True))
            left -= n
            i += 1
        return MixedPlan(rows) if rows else None

    def chunk_done(self, r: SchedRequest, n: int) -> bool:
        """``n`` more prompt tokens of ``r`` are cached; True when that completed its prompt."""
        r.num_computed += n
        if r.num_computed < r.num_prompt:
            return False
        self.prefilling.remove(r)
        return True

    def prefilled(self, r: SchedRequest) -> None:
        r.state = RequestState.RUNNING
        self.running.append(r)
