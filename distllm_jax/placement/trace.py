"""Recorded serving runs (traces) and their replay through the simulator.

A trace is what a real run saw, one request at a time: its arrival, its prompt and output lengths and,
where they were measured, its TTFT and TPOT. Replaying the arrivals and lengths through the simulator
and comparing the two summaries is how the simulator is checked against real systems (``distllm
simulate --trace``, ``bench/sim_vs_real.py``).

Two formats are read:
- JSON Lines, one request a line: ``{"arrival_s", "prompt_len", "output_len"}`` plus optional
  ``"ttft_s"`` and ``"tpot_s"`` (seconds). ``bench/traces/distserve-a100-opt13b/`` holds
  DistServe's published A100 runs in this form.
- DistServe's own benchmark results (``.exp``, written by its ``2-benchmark-serving.py``): the first line
  is a Python literal list of dicts with ``prompt_len``, ``output_len``, ``issue_time`` (s),
  ``ttft_ms`` and ``tpot_ms``. Read with ``ast.literal_eval`` (never ``eval``: a trace is data), with
  arrivals relative to the first issue time and sorted, as DistServe's ``align_with_real.py`` reads them.

A request attains the SLO when its TTFT < the TTFT target and its TPOT < the TPOT target (strict, as
DistServe's alignment script counts it).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from distllm_jax.placement.latency import Profile
from distllm_jax.placement.simulator import SimConfig, Simulator, SimRequest


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds since the run's first request
    prompt_len: int
    output_len: int
    ttft_s: float | None = None  # what the real system measured (None: not recorded)
    tpot_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Trace:
    path: str
    requests: tuple[TraceRequest, ...]

    @property
    def measured(self) -> bool:
        """Every request carries its measured TTFT and TPOT."""
        return bool(self.requests) and all(r.ttft_s is not None and r.tpot_s is not None for r in self.requests)

    @property
    def name(self) -> str:
        return Path(self.path).stem


def _number(v: Any, where: str, key: str, *, integer: bool = False, minimum: float = 0.0) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TraceError(f"{where}: {key!r} must be a number, got {v!r}")
    if not math.isfinite(v) or v < minimum:
        raise TraceError(f"{where}: {key!r} must be finite and >= {minimum:g}, got {v!r}")
    if integer:
        if int(v) != v:
            raise TraceError(f"{where}: {key!r} must be a whole number of tokens, got {v!r}")
        return int(v)
    return float(v)


def _request(rec: Any, where: str, keys: dict[str, str], scale: float) -> TraceRequest:
    """One request from a record; ``keys`` maps our field names to the record's, ``scale`` converts
    the latencies to seconds."""
    if not isinstance(rec, dict):
        raise TraceError(f"{where}: expected an object with {keys['arrival_s']!r}, 'prompt_len', 'output_len', "
                         f"got {type(rec).__name__}")
    for f in ("arrival_s", "prompt_len", "output_len"):
        if keys[f] not in rec:
            raise TraceError(f"{where}: missing {keys[f]!r}")
    lat = {}
    for f in ("ttft_s", "tpot_s"):
        v = rec.get(keys[f])
        lat[f] = None if v is None else _number(v, where, keys[f]) * scale
    return TraceRequest(_number(rec[keys["arrival_s"]], where, keys["arrival_s"], minimum=-math.inf),
                        _number(rec[keys["prompt_len"]], where, keys["prompt_len"], integer=True, minimum=1),
                        _number(rec[keys["output_len"]], where, keys["output_len"], integer=True, minimum=1),
                        lat["ttft_s"], lat["tpot_s"])


_JSONL_KEYS = {"arrival_s": "arrival_s", "prompt_len": "prompt_len", "output_len": "output_len",
               "ttft_s": "ttft_s", "tpot_s": "tpot_s"}
_EXP_KEYS = {"arrival_s": "issue_time", "prompt_len": "prompt_len", "output_len": "output_len",
             "ttft_s": "ttft_ms", "tpot_s": "tpot_ms"}


def _checked(path: Path, reqs: list[TraceRequest], where: Sequence[str]) -> Trace:
    if not reqs:
        raise TraceError(f"{path}: no requests")
    has = [r.ttft_s is not None and r.tpot_s is not None for r in reqs]
    if any(has) and not all(has):
        i = has.index(False)
        raise TraceError(f"{where[i]}: has no measured ttft/tpot while other requests do "
                         "(a trace is measured throughout or not at all)")
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    return Trace(str(path), tuple(reqs[i] for i in order))


def read_jsonl(path: str | Path) -> Trace:
    """A JSON Lines trace; arrivals as recorded (seconds), requests sorted by arrival."""
    path = Path(path)
    reqs, where = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        w = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{w}: not JSON ({e.msg})") from None
        reqs.append(_request(rec, w, _JSONL_KEYS, 1.0))
        if reqs[-1].arrival_s < 0:
            raise TraceError(f"{w}: 'arrival_s' must be >= 0, got {reqs[-1].arrival_s!r}")
        where.append(w)
    return _checked(path, reqs, where)


def read_exp(path: str | Path) -> Trace:
    """A DistServe benchmark result (``.exp``): its first line, a Python literal list of dicts; the
    arrivals relative to the first issue time, latencies from ms to seconds."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        first = f.readline().strip()
    try:
        recs = ast.literal_eval(first)
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise TraceError(f"{path}:1: not a Python literal list of request dicts ({type(e).__name__})") from None
    if not isinstance(recs, list):
        raise TraceError(f"{path}:1: expected a list of request dicts, got {type(recs).__name__}")
    where = [f"{path}:1: request {i}" for i in range(len(recs))]
    reqs = [_request(r, w, _EXP_KEYS, 1e-3) for r, w in zip(recs, where)]
    if not reqs:
        raise TraceError(f"{path}: no requests")
    # _request scaled only the latencies; issue times are seconds already
    base = min(r.arrival_s for r in reqs)
    reqs = [dataclasses.replace(r, arrival_s=r.arrival_s - base) for r in reqs]
    return _checked(path, reqs, where)


def read_trace(path: str | Path) -> Trace:
    """A trace by its format: ``.exp`` (or a first character ``[``) is DistServe's, else JSON Lines."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    if path.suffix == ".exp":
        return read_exp(path)
    with path.open(encoding="utf-8") as f:
        head = f.read(1)
    return read_exp(path) if head == "[" else read_jsonl(path)


def summarize(ttfts: Sequence[float], tpots: Sequence[float], slo: tuple[float, float]) -> dict[str, float]:
    """Attainment (%, strict: TTFT < target and TPOT < target) and p50/p90 of TTFT and TPOT (s)."""
    if len(ttfts) != len(tpots) or not len(ttfts):
        raise ValueError(f"summarize needs as many TTFTs as TPOTs, at least one (got {len(ttfts)}, {len(tpots)})")
    a, b = np.asarray(ttfts, float), np.asarray(tpots, float)
    ok = (a < slo[0]) & (b < slo[1])
    return {"attainment_pct": float(100.0 * ok.mean()),
            "ttft_p50_s": float(np.percentile(a, 50)), "ttft_p90_s": float(np.percentile(a, 90)),
            "tpot_p50_s": float(np.percentile(b, 50)), "tpot_p90_s": float(np.percentile(b, 90))}


def replay(trace: Trace, profile: Profile, cfg: SimConfig) -> list[SimRequest]:
    """The trace's arrivals and lengths through the simulator, in the trace's order."""
    reqs = [SimRequest(r.arrival_s, r.prompt_len, r.output_len) for r in trace.requests]
    Simulator(profile, cfg).run(reqs)
    return reqs


def compare(trace: Trace, profile: Profile, cfg: SimConfig, slo: tuple[float, float]) -> dict[str, Any]:
    """The report of ``distllm simulate --trace --json``: the simulated summary beside the measured one
    (``trace``: None when the trace has no measurements)."""
    sim = replay(trace, profile, cfg)
    out: dict[str, Any] = {"requests": len(trace.requests), "slo": [slo[0], slo[1]],
                           "sim": summarize([r.ttft for r in sim], [r.tpot for r in sim], slo), "trace": None}
    if trace.measured:
        out["trace"] = summarize([r.ttft_s for r in trace.requests], [r.tpot_s for r in trace.requests], slo)
    return out
