"""Per-request records and what serving benchmarks report from them: latency percentiles,
throughput, SLO attainment, goodput (bisection over rates) and the tightest SLO scale."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from distllm_jax.workload.slo import SLO


@dataclasses.dataclass
class RequestRecord:
    """One request as the client saw it (times in seconds from the run's start), plus the server's timings."""

    index: int
    arrival: float
    prompt_len: int
    output_len: int  # asked for
    sent: float = math.nan
    first_token: float = math.nan
    finish: float = math.nan
    output_tokens: int = 0
    token_times: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None
    finish_reason: str | None = None
    server: dict = dataclasses.field(default_factory=dict)  # server-side timings (ttft, queueing, ...)
    prompt: str | None = None
    response: str | None = None
    # a turn of a conversation replay (left out of to_dict() otherwise, so other runs' files keep their shape)
    conversation: str | None = None
    turn: int | None = None
    shared_prefix: int | None = None  # leading prompt tokens that are the previous turn's prompt and reply

    def tokens_at(self, now: float, n: int) -> None:
        """``n`` output tokens came at ``now``: the first sets the first-token time."""
        if not self.token_times:
            self.first_token = now
        self.token_times += [now] * n
        self.output_tokens += n

    @property
    def ok(self) -> bool:
        return self.error is None and not math.isnan(self.first_token)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival if self.ok else math.inf

    @property
    def tpot(self) -> float:
        """(finish - first token) / (tokens - 1); 0 for a single token."""
        if not self.ok:
            return math.inf
        if self.output_tokens < 2:
            return 0.0
        return (self.finish - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float:
        return self.finish - self.arrival if self.ok else math.inf

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ttft=_finite(self.ttft), tpot=_finite(self.tpot), latency=_finite(self.latency))
        for k in ("sent", "first_token", "finish"):
            d[k] = _finite(d[k])
        if self.conversation is None:
            for k in _TURN_FIELDS:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: (math.nan if v is None and k in ("sent", "first_token", "finish") else v)
             for k, v in d.items() if k in fields}
        return cls(**d)


_TURN_FIELDS = ("conversation", "turn", "shared_prefix")


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def attainment(records: Sequence[RequestRecord], slo: SLO, scale: float = 1.0) -> float:
    """Share of requests meeting both targets (a failed request meets neither)."""
    if not records:
        return 0.0
    s = slo.scaled(scale)
    return sum(1 for r in records if r.ttft <= s.ttft and r.tpot <= s.tpot) / len(records)


def _pct(xs: Sequence[float], q: float) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return float(np.percentile(xs, q)) if xs else math.nan


def summarize(records: Sequence[RequestRecord], slo: SLO | None = None) -> dict:
    ok = [r for r in records if r.ok]
    span = (max(r.finish for r in ok) - min(r.arrival for r in records)) if ok else math.nan
    out = {
        "requests": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "duration_s": span,
        "request_throughput": len(ok) / span if ok and span > 0 else 0.0,
        "output_throughput": sum(r.output_tokens for r in ok) / span if ok and span > 0 else 0.0,
    }
    for name in ("ttft", "tpot", "latency"):
        xs = [getattr(r, name) for r in ok]
        out[f"mean_{name}"] = float(np.mean(xs)) if xs else math.nan
        for q in (50, 90, 99):
            out[f"p{q}_{name}"] = _pct(xs, q)
    if slo is not None:
        out["slo_ttft"], out["slo_tpot"] = slo.ttft, slo.tpot
        out["attainment"] = attainment(records, slo)
        out["ttft_attainment"] = sum(r.ttft <= slo.ttft for r in records) / max(1, len(records))
        out["tpot_attainment"] = sum(r.tpot <= slo.tpot for r in records) / max(1, len(records))
    return out


def conversation_summary(records: Sequence[RequestRecord], planned_turns: int) -> dict:
    """What a conversation replay adds to :func:`summarize`: conversations and turns served (a turn
    that fails ends its conversation, so ``turns_unsent`` of the ``planned_turns`` were never sent) and
    the best-case prefix share, the prompt tokens a prefix cache holding each conversation's previous
    turn could skip over all prompt tokens sent."""
    turns = [r for r in records if r.conversation is not None]
    convs = {r.conversation for r in turns}
    prompt = sum(r.prompt_len for r in turns)
    shared = sum(r.shared_prefix or 0 for r in turns)
    return {"conversations": len(convs), "turns": len(turns), "turns_unsent": planned_turns - len(turns),
            "mean_turns": len(turns) / len(convs) if convs else 0.0, "prompt_tokens": prompt,
            "shared_prefix_tokens": shared, "prefix_share": shared / prompt if prompt else 0.0}


def tightest_scale(records: Sequence[RequestRecord], slo: SLO, target: float = 0.9,
                   lo: float = 0.01, hi: float = 100.0) -> float:
    """Smallest SLO scale at which attainment reaches ``target`` (inf if none does)."""
    if attainment(records, slo, hi) < target:
        return math.inf
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if attainment(records, slo, mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi
