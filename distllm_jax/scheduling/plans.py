"""What a scheduler asks its instance to run: typed plans instead of tuples crossing modules."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar

from distllm_jax.scheduling.protocols import SchedRequest, Slot


class StepKind(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


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
