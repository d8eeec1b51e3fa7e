"""The colocated baselines' policies, so every comparison runs in the same engine.

- :class:`ColocatedScheduler` (vLLM-style): one instance runs both phases; whenever waiting prompts
  fit, a prefill step runs first (prefill-prioritised), otherwise one decode step over the batch.
- :class:`ChunkedScheduler` (DeepSpeed-MII / SplitFuse-style): every step mixes one token of each
  running request with chunks of waiting prompts, up to the token budget; a long prompt spans steps.

Both manage pages as their :class:`~distllm_jax.scheduling.memory.KVPolicy` says: on demand (the
running batch grows page by page and preempts when the pool runs short), or reserved whole when a
request is admitted. Either way a swapped-out request comes back before a new prompt is admitted.
"""

from __future__ import annotations

from typing import Callable

from distllm_jax.scheduling.memory import KVManager, KVPolicy, RoomPlan
from distllm_jax.scheduling.plans import DecodePlan, MixedPlan, MixedRow, PrefillPlan
from distllm_jax.scheduling.prefill import take_prompts, waiting_here
from distllm_jax.scheduling.protocols import QueueState, RequestState, SchedRequest, Slot


class _OneInstance:
    """What both colocated policies share: a decode batch and its pages."""

    def __init__(self, queues: QueueState, inst: Slot, budget: int, policy: KVPolicy | None = None):
        self.queues, self.inst, self.budget = queues, inst, budget
        self.running: list[SchedRequest] = []
        self.kv = KVManager(queues, inst, policy or KVPolicy())

    def make_room(self, need: Callable[[SchedRequest], int], can_preempt: bool = True) -> RoomPlan | None:
        return self.kv.make_room(self.running, need, can_preempt)

    def _admit(self, now: float, max_seqs: int, budget: int, room: int, busy: bool) -> list[SchedRequest]:
        """Waiting prompts that fit (none while a swapped-out request waits to come back)."""
        if self.kv.swapped:
            return []
        return take_prompts(self.queues, self.inst, budget=budget, max_seqs=max_seqs, tokens=self.kv.prefill_tokens,
                            now=now, room=room, headroom=self.kv.headroom(busy))


class ColocatedScheduler(_OneInstance):
    @property
    def load(self) -> int:
        return len(self.running) + len(self.kv.swapped)

    def has_work(self) -> bool:
        return bool(self.running or self.kv.swapped) or (waiting_here(self.queues, self.inst)
                                                         and self.load < self.inst.max_batch)

    def plan(self, now: float) -> PrefillPlan | DecodePlan | None:
        """Waiting prompts first while they fit, else one decode step (its room made by the caller:
        :meth:`make_room`)."""
        batch = self._admit(now, self.inst.max_prefill_seqs, self.budget, self.inst.max_batch - self.load,
                            busy=bool(self.running))
        if batch:
            return PrefillPlan(batch)
        return DecodePlan(list(self.running)) if self.running or self.kv.swapped else None

    def prefilled(self, r: SchedRequest) -> None:
        """``r``'s prefill is cached (``num_computed``) and its next token is out, and it goes on: it
        joins the decode batch."""
        r.state = RequestState.RUNNING
        self.running.append(r)


class ChunkedScheduler(_OneInstance):
    def __init__(self, queues: QueueState, inst: Slot, budget: int, policy: KVPolicy | None = None):
        super().__init__(queues, inst, budget, policy)
        self.prefilling: list[SchedRequest] = []  # admitted, prompt partly computed (FCFS)

    @property
    def load(self) -> int:
        """Decode rows, now and once the admitted prompts are in (each of their samples is one)."""
        return len(self.running) + len(self.kv.swapped) + sum(1 + len(r.siblings) for r in self.prefilling)

    def has_work(self) -> bool:
        return (bool(self.running or self.prefilling or self.kv.swapped)
                or (waiting_here(self.queues, self.inst) and self.load < self.inst.max_batch))

    def plan(self, now: float) -> MixedPlan | None:
        """One decode row per running request (its room made by the caller: :meth:`make_room`), then
        prompt chunks FCFS until the budget is spent (the next waiting prompt is admitted only when
        every admitted one has its chunk)."""
        rows = [MixedRow(r, r.num_computed, 1, False) for r in self.running]
        left, i = self.budget - len(rows), 0
        while left > 0:
            if i == len(self.prefilling):
                if not waiting_here(self.queues, self.inst) or self.load >= self.inst.max_batch:
                    break
                # one prompt at a time, with pages for all of it: its chunks run over several steps
                # (budget 0: the first prompt only)
                admitted = self._admit(now, self.inst.max_batch, 0, self.inst.max_batch - self.load,
                                       busy=bool(self.running or self.prefilling))
                if not admitted:
                    break
                self.prefilling += admitted
            r = self.prefilling[i]
            n = min(left, r.num_prefill - r.num_computed)
            rows.append(MixedRow(r, r.num_computed, n, True))
            left -= n
            i += 1
        return MixedPlan(rows) if rows else None

    def chunk_done(self, r: SchedRequest, n: int) -> bool:
        """``n`` more prompt tokens of ``r`` are cached; True when that completed its prompt."""
        r.num_computed += n
        if r.num_computed < r.num_prefill:
            return False
        self.prefilling.remove(r)
        return True

    def prefilled(self, r: SchedRequest) -> None:
        r.state = RequestState.RUNNING
        self.running.append(r)
