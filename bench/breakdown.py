"""Where a request's latency goes (the paper's Figure 10), the KV migration it paid, and goodput read
off a measured attainment curve. Pure arithmetic on run records: no devices, no server.

A request's end-to-end latency (server clock: arrival -> finish) splits into

- **queueing**: arrival -> prefill start;
- **prefill**: prefill start -> first token (the prefill step that produced it);
- **migration**: KV migration start -> end (0 when the request did not migrate);
- **decode**: the rest, i.e. first token -> finish minus migration. The gRPC ``Timings`` carry no
  migration-start stamp, so the time a prefilled request waits in prefill memory for a decode instance
  to pull it is counted here, with the decode steps.

The four parts sum to the end-to-end latency by construction (each is clamped at 0, then the shares
are normalised).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

PHASES = ("queueing", "prefill", "migration", "decode")


def request_parts(server: dict) -> dict[str, float] | None:
    """Seconds in each phase from the server's per-request timings (``RequestRecord.server``:
    ``ttft``, ``queueing``, ``migration``, ``e2e``); None when the record has none."""
    if not server or not server.get("e2e"):
        return None
    q = max(0.0, server["queueing"])
    pre = max(0.0, server["ttft"] - server["queueing"])
    mig = max(0.0, server["migration"])
    dec = max(0.0, server["e2e"] - server["ttft"] - server["migration"])
    return {"queueing": q, "prefill": pre, "migration": mig, "decode": dec}


def shares(parts: dict[str, float]) -> dict[str, float]:
    total = sum(parts.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in parts.items()}


def summarize_breakdown(servers: Iterable[dict]) -> dict:
    """Per-phase mean seconds, mean per-request share, and share of all latency summed over requests."""
    parts = [p for p in (request_parts(s) for s in servers) if p is not None]
    if not parts:
        return {"requests": 0}
    total = sum(sum(p.values()) for p in parts)
    per_req = [shares(p) for p in parts]
    return {
        "requests": len(parts),
        "mean_seconds": {k: float(np.mean([p[k] for p in parts])) for k in PHASES},
        "mean_share": {k: float(np.mean([s[k] for s in per_req])) for k in PHASES},
        "share_of_total": {k: (sum(p[k] for p in parts) / total if total > 0 else 0.0) for k in PHASES},
        "share_sum_max_abs_err": float(max(abs(sum(s.values()) - 1.0) for s in per_req)),
    }


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one token over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def migration_stats(records: Sequence[dict], bytes_per_token: float) -> dict:
    """Migration time distribution and bandwidth (prompt KV bytes / migration time) of the requests
    that migrated. ``records`` are compact run records (``prompt_len``, ``server``)."""
    rows = [(r["prompt_len"], r["server"]["migration"]) for r in records
            if r.get("server") and r["server"].get("migration", 0) > 0]
    if not rows:
        return {"migrated": 0}
    t = np.array([m for _, m in rows])
    b = np.array([p * bytes_per_token for p, _ in rows])
    bw = b / t
    return {
        "migrated": len(rows),
        "time_s": {"mean": float(t.mean()), "p50": float(np.median(t)), "p90": float(np.percentile(t, 90)),
                   "p99": float(np.percentile(t, 99)), "max": float(t.max())},
        "bytes": {"mean": float(b.mean()), "total": float(b.sum())},
        "bandwidth_gbps": {"p50": float(np.median(bw)) / 1e9, "mean": float(bw.mean()) / 1e9,
                           "aggregate": float(b.sum() / t.sum()) / 1e9},
        "cdf": cdf(t.tolist()),
    }


def cdf(xs: Sequence[float], points: int = 50) -> list[tuple[float, float]]:
    """(value, fraction <= value) at up to ``points`` evenly spaced ranks."""
    s = sorted(x for x in xs if math.isfinite(x))
    if not s:
        return []
    idx = sorted({min(len(s) - 1, round(i * (len(s) - 1) / max(1, points - 1))) for i in range(points)})
    return [(float(s[i]), (i + 1) / len(s)) for i in idx]


def interpolated_goodput(rates: Sequence[float], attain: Sequence[float], target: float = 0.9) -> dict:
    """Highest rate with attainment >= target, read off measured (rate, attainment) points: the last
    rate that meets it before the first that does not, linearly interpolated to the crossing between
    those two (as bisection would converge, assuming attainment falls with rate).

    ``bound``: ``"exact"`` (a crossing was bracketed), ``"lower"`` (every rate met it: goodput is at
    least the highest rate), ``"upper"`` (none did: goodput is below the lowest rate, reported 0)."""
    pts = sorted(zip(rates, attain))
    if not pts:
        return {"goodput": 0.0, "bound": "upper"}
    if pts[0][1] < target:
        return {"goodput": 0.0, "bound": "upper", "below": pts[0][0]}
    for (r0, a0), (r1, a1) in zip(pts, pts[1:]):
        if a1 < target:
            g = r0 + (r1 - r0) * (a0 - target) / (a0 - a1) if a0 > a1 else r0
            return {"goodput": float(g), "bound": "exact", "between": [r0, r1]}
    return {"goodput": float(pts[-1][0]), "bound": "lower"}


def goodput_ratio(a: dict, b: dict) -> dict:
    """a / b of two :func:`interpolated_goodput` results, with what the bounds allow to be said."""
    ga, gb = a["goodput"], b["goodput"]
    if gb <= 0:
        return {"ratio": None, "note": "the baseline meets the SLO at no measured rate"}
    r = ga / gb
    note = {("exact", "exact"): "exact", ("lower", "exact"): "at least", ("exact", "lower"): "at most",
            ("upper", "exact"): "at most", ("lower", "lower"): "undetermined (both above the measured rates)"}
    return {"ratio": float(r), "note": note.get((a["bound"], b["bound"]), "undetermined")}
