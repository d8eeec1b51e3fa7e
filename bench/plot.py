"""The paper's figures from run files: SLO attainment vs per-GPU rate and vs SLO scale for several
modes (Figures 8/9), and the latency breakdown (queueing, prefill, migration, decode: Figure 10)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from bench.metrics import RequestRecord, attainment
from bench.runs import load_run
from bench.slo import SLO


def collect(paths: Sequence[Path]) -> dict[str, list[tuple[dict, list[RequestRecord]]]]:
    """Run files (or folders of them) grouped by mode."""
    files: list[Path] = []
    for p in paths:
        files += sorted(Path(p).rglob("*.json")) if Path(p).is_dir() else [Path(p)]
    by_mode: dict[str, list] = defaultdict(list)
    for f in files:
        try:
            cfg, recs = load_run(f)
        except (KeyError, ValueError):
            continue  # not a run file
        by_mode[cfg["config"]["mode"]].append((cfg, recs))
    for runs in by_mode.values():
        runs.sort(key=lambda r: r[0]["config"]["rate"])
    return dict(by_mode)


def breakdown(recs: Sequence[RequestRecord]) -> dict[str, float]:
    """Mean seconds per request in each phase, from the server's timings."""
    parts = defaultdict(float)
    ok = [r for r in recs if r.ok and r.server]
    for r in ok:
        s = r.server
        parts["queueing"] += s["queueing"]
        parts["prefill"] += max(0.0, s["ttft"] - s["queueing"])
        parts["migration"] += s["migration"]
        parts["decode"] += max(0.0, s["e2e"] - s["ttft"] - s["migration"])
    return {k: v / max(1, len(ok)) for k, v in parts.items()}


def plot(paths: Sequence[Path], slo: SLO, out: Path, scale_rate: float | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_mode = collect(paths)
    if not by_mode:
        raise ValueError(f"no run files under {[str(p) for p in paths]}")
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    table = {}
    for mode, runs in sorted(by_mode.items()):
        xs = [c["config"]["rate"] / max(1, c["config"]["devices"]) for c, _ in runs]
        ys = [100 * attainment(r, slo) for _, r in runs]
        a1.plot(xs, ys, marker="o", label=mode)
        target = scale_rate if scale_rate is not None else xs[len(xs) // 2]
        i = min(range(len(xs)), key=lambda j: abs(xs[j] - target))
        scales = [0.25 * 1.25**k for k in range(20)]
        a2.plot(scales, [100 * attainment(runs[i][1], slo, s) for s in scales], marker=".",
                label=f"{mode} @ {xs[i]:g} req/s/GPU")
        table[mode] = {"per_gpu_rate": xs, "attainment": ys, "breakdown": breakdown(runs[i][1])}
    for ax in (a1, a2):
        ax.axhline(90, color="grey", ls="--", lw=1)
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.legend()
    a1.set_xlabel("rate per GPU (req/s)")
    a1.set_title(f"attainment vs rate (TTFT {slo.ttft:g}s, TPOT {slo.tpot:g}s)")
    a2.set_xlabel("SLO scale")
    a2.set_xscale("log")
    a2.set_title("attainment vs SLO scale")
    modes = sorted(table)
    bottom = [0.0] * len(modes)
    for phase in ("queueing", "prefill", "migration", "decode"):
        vals = [table[m]["breakdown"].get(phase, 0.0) for m in modes]
        a3.bar(modes, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a3.set_ylabel("mean seconds per request")
    a3.set_title("latency breakdown")
    a3.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {m: {k: v for k, v in t.items()} for m, t in table.items() if not math.isnan(0.0)}
