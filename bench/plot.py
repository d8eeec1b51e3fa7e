"""The paper's figures from run files: SLO attainment vs per-GPU rate and vs SLO scale for several
modes (Figures 8/9), and the latency breakdown (queueing, prefill, migration, decode: Figure 10)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from bench.metrics import RequestRecord, attainment
from bench.runs import load_run
from distllm_jax.workload.slo import SLO


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


MARKERS = ("o", "s", "^", "D", "v", "P")


def dodge(series: dict[str, tuple[Sequence[float], Sequence[float]]], tol: float = 1.0,
          frac: float = 0.015) -> dict[str, list[float]]:
    """x positions for drawing ``{mode: (xs, ys)}`` with points that coincide across modes (same x, y
    within ``tol``) spread sideways by ``frac`` of the x range, so none hides another; every other point
    keeps its x. The modes of a group are spread in name order, so a mode's offset is stable."""
    out = {m: list(xs) for m, (xs, _) in series.items()}
    all_x = [x for xs, _ in series.values() for x in xs]
    if not all_x:
        return out
    step = frac * ((max(all_x) - min(all_x)) or max(abs(x) for x in all_x) or 1.0)
    at: dict[float, list[tuple[float, str, int]]] = defaultdict(list)
    for m, (xs, ys) in series.items():
        for i, (x, y) in enumerate(zip(xs, ys)):
            at[x].append((y, m, i))
    for x, pts in at.items():
        groups: list[list[tuple[float, str, int]]] = []
        for p in sorted(pts):
            if groups and p[0] - groups[-1][-1][0] <= tol:
                groups[-1].append(p)
            else:
                groups.append([p])
        for g in groups:
            if len({m for _, m, _ in g}) > 1:
                for k, (_, m, i) in enumerate(sorted(g, key=lambda p: p[1])):
                    out[m][i] = x + step * (k - (len(g) - 1) / 2)
    return out


def plot(paths: Sequence[Path], slo: SLO, out: Path, scale_rate: float | None = None,
         per_gpu: bool = True) -> dict:
    """Attainment vs rate, vs SLO scale (at ``scale_rate``, on the same x axis) and the latency breakdown,
    saved as one PNG; returns the numbers drawn, per mode. ``per_gpu``: the x axis is the rate divided by
    the devices the layout used (the paper's Figure 8), else the rate the client sent (as a run table
    shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_mode = collect(paths)
    if not by_mode:
        raise ValueError(f"no run files under {[str(p) for p in paths]}")
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.5))
    unit = "req/s/GPU" if per_gpu else "req/s"
    table, series, scale_runs = {}, {}, {}
    for mode, runs in sorted(by_mode.items()):
        rates = [c["config"]["rate"] for c, _ in runs]
        per = [c["config"]["rate"] / max(1, c["config"]["devices"]) for c, _ in runs]
        xs = per if per_gpu else rates
        ys = [100 * attainment(r, slo) for _, r in runs]
        series[mode] = (xs, ys)
        target = scale_rate if scale_rate is not None else xs[len(xs) // 2]
        i = min(range(len(xs)), key=lambda j: abs(xs[j] - target))
        scale_runs[mode] = runs[i][1]
        table[mode] = {"rate": rates, "per_gpu_rate": per, "attainment": ys, "breakdown": breakdown(runs[i][1]),
                       "scale_at": xs[i]}
    drawn = dodge(series)
    for k, mode in enumerate(sorted(series)):
        marker = MARKERS[k % len(MARKERS)]
        a1.plot(drawn[mode], series[mode][1], marker=marker, mfc="none", label=mode)
        scales = [0.25 * 1.25**j for j in range(20)]
        a2.plot(scales, [100 * attainment(scale_runs[mode], slo, sc) for sc in scales], marker=marker, mfc="none",
                markevery=2, label=f"{mode} @ {table[mode]['scale_at']:g} {unit}")
    for ax in (a1, a2):
        ax.axhline(90, color="grey", ls="--", lw=1)
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.legend()
    a1.set_xlabel(f"rate per GPU ({unit})" if per_gpu else f"request rate ({unit})")
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
    return table
