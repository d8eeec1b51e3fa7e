"""The compiled shapes: the sizes a step is padded up to, for the engine that compiles them and the
simulator that charges their padding.

XLA compiles one program per input shape, so the engine pads every step to one of a few sizes fixed at
start-up (prompt tokens of a prefill, rows of a decode batch, tokens of a chunked step; pages of a KV
migration) and compiles exactly those. The simulator models an engine that pads the same way, so both
read the sizes from here. Pure (no jax): ``distllm_jax.engine`` imports jax in its package, and the
simulator, the placement search and the benchmarks' parents must stay free of it.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from typing import Literal, Sequence


class StepKind(enum.StrEnum):
    """What one step of an instance runs, and so which program: a prefill (whole prompts packed into
    one sequence of tokens), a decode step (one token a row) or a mixed step (chunks of prompts that
    attend over the pool, beside decode rows). A ``str`` enum: it prints, compares and hashes as its
    value, so step logs, stats and JSON keep the plain words."""

    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"


# EngineConfig.min_token_bucket's default: the smallest prompt-token shape (fewer, larger programs
# below it cost little, a prompt is rarely that short)
MIN_TOKEN_BUCKET = 16


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """lo, 2lo, 4lo, ... up to the first value >= hi (a single bucket max(1, lo) when hi <= lo): doubling
    keeps both the program count (log2 of the range) and the padding (under half a step) small."""
    out, b = [], max(1, lo)
    while b < hi:
        out.append(b)
        b *= 2
    out.append(b)
    return tuple(out)


def bucket(buckets: Sequence[int], n: int, *, above: Literal["raise", "exact"] = "raise") -> int:
    """The smallest of the (ascending) ``buckets`` that holds ``n``.

    Above the largest bucket ``above`` decides: ``"raise"`` (the engine and its KV paths) is a
    ValueError, since no program was compiled for it and the callers' limits should have kept ``n``
    within the top bucket; ``"exact"`` (the simulator) returns ``n`` unpadded, the step timed at its own
    size as if a program of that shape existed.
    """
    i = bisect.bisect_left(buckets, n)
    if i < len(buckets):
        return buckets[i]
    if above == "exact":
        return n
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class CompiledShapes:
    """One instance's step shapes, by step kind: ``prefill`` (prompt tokens packed into one prefill),
    ``decode`` (rows of a decode batch), ``mixed`` (tokens of a chunked-prefill step)."""

    prefill: tuple[int, ...]
    decode: tuple[int, ...]
    mixed: tuple[int, ...]

    def for_kind(self, kind: StepKind | str) -> tuple[int, ...]:
        """The shapes of one step kind (a plain ``"prefill"``, ``"decode"`` or ``"mixed"`` too)."""
        try:
            kind = StepKind(kind)
        except ValueError:
            raise ValueError(f"unknown step kind {kind!r}") from None
        return getattr(self, kind.value)

    def sim_fields(self) -> dict[str, tuple[int, ...]]:
        """The SimConfig fields that pad a simulated step as the engine pads it. The simulator pads a
        chunked step with the prefill shapes: ``mixed`` is their prefix up to the token budget, and a
        chunked step never exceeds the budget, so the two pick the same shape."""
        return {"token_buckets": self.prefill, "batch_buckets": self.decode}


def compiled_shapes(*, prefill_token_budget: int, max_decode_batch: int, max_len: int,
                    min_token_bucket: int = MIN_TOKEN_BUCKET, prefix_prefill: bool = False) -> CompiledShapes:
    """The shapes an instance compiles for these limits (an EngineConfig's, ``max_len`` its
    ``seq_len``): prompt tokens up to the budget or one whole sequence, whichever is longer (a single
    prompt over the budget still runs, alone); decode rows in powers of two below the batch limit and
    the limit itself (a full batch pads no further); chunked steps up to the budget, which bounds them.
    ``prefix_prefill``: prompts over cached prefixes run as mixed steps, so those take the prefill
    shapes (a single prompt over the budget runs alone there too).
    """
    top = max(prefill_token_budget, max_len)
    decode = tuple(b for b in pow2_buckets(1, max_decode_batch) if b < max_decode_batch) + (max_decode_batch,)
    return CompiledShapes(prefill=pow2_buckets(min_token_bucket, top), decode=decode,
                          mixed=pow2_buckets(min_token_bucket, top if prefix_prefill else prefill_token_budget))
