"""What a scheduler asks its instance to run, and what a step that ran looks like: typed plans and
records instead of tuples crossing modules."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

from distllm_jax.scheduling.protocols import SchedRequest, Slot
from distllm_jax.shapes import StepKind


class StepRecord(NamedTuple):
    """One step as it ran: the engine's step log (``Engine.step_log``) and the simulator's recorded
    steps alike, so the two are compared with the same code. Wall-clock start and end (a lookahead
    decode step ends when its ids are read, and starts when the previous step's were, if it was
    dispatched before that), its tokens per segment (a prompt, a chunk or one decode token), the
    context its attention read (Σ positions + tokens) and, where known, its requests row by row."""

    instance: str
    kind: StepKind
    start: float
    end: float
    lengths: tuple[int, ...]
    context: int
    rids: tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class PrefillPlan:
    """Whole prompts, packed into one prefill step."""

    batch: list[SchedRequest]
    kind: ClassVar[StepKind] = StepKind.PREFILL


@dataclasses.dataclass
class DecodePlan:
    """One token of each running request."""

    batch: list[SchedRequest]
    kind: ClassVar[StepKind] = StepKind.DECODE


@dataclasses.dataclass
class MixedRow:
    """A row of a mixed (chunked-prefill) step: ``length`` tokens of ``req`` from position ``start``;
    a decode row has length 1 and ``chunk`` False."""

    req: SchedRequest
    start: int
    length: int
    chunk: bool


@dataclasses.dataclass
class MixedPlan:
    rows: list[MixedRow]
    kind: ClassVar[StepKind] = StepKind.MIXED


@dataclasses.dataclass
class PullPlan:
    """Move ``req``'s KV (its first ``len(src_pages)`` pages) from ``src`` into ``dst_pages`` here.
    ``staged``: the gather a prefill worker dispatched for it ahead of its next step, or the error
    that dispatching it raised (the engine's mechanism; None in the simulator)."""

    req: SchedRequest
    src: Slot
    src_pages: list[int]
    dst_pages: list[int]
    staged: Any = None
