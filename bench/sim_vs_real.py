"""The simulator against real A100 runs: every trace in a folder replayed under its system's rules and
compared with what the real system measured (issue 20's calibration check).

    python -m bench.sim_vs_real [--traces DIR] [--out bench/results/sim-vs-real-a100-opt13b.json]
    distllm bench sim-vs-real [same flags]

A trace's file name says what ran it (DistServe's own naming):
- ``vllm-N-R``: vLLM, one colocated instance tp1 pp1, profile ``a100-opt-13b-vllm``, system ``vllm``;
- ``distserve-cPQdRS-N-R``: DistServe, prefill tp P pp Q, decode tp R pp S, profile ``a100-opt-13b``,
  system ``distserve``.
The per-run table gives measured vs simulated attainment and p50/p90 of TTFT and TPOT, the RMSE of
attainment over the runs and per system (the goal: 5 points), and the median errors (goal: 10 %).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.latency import load_profile
from distllm_jax.placement.simulator import SimConfig
from distllm_jax.placement.systems import system_config
from distllm_jax.placement.trace import compare, read_trace

# DistServe's published A100 runs, shipped with the bench (bench/traces/distserve-a100-opt13b/README.md)
DEFAULT_TRACES = Path(__file__).parent / "traces" / "distserve-a100-opt13b"
TRACE_SUFFIXES = (".jsonl", ".exp")


@dataclasses.dataclass(frozen=True)
class Run:
    """What a trace's name says ran it."""

    name: str
    system: str
    profile: str
    cfg: SimConfig
    requests: int
    rate: float

    @property
    def layout(self) -> str:
        if self.cfg.mode == "disaggregated":
            p, d = self.cfg.prefill[0], self.cfg.decode[0]
            return f"p tp{p.tp}pp{p.pp} + d tp{d.tp}pp{d.pp}"
        c = self.cfg.colocated[0]
        return f"tp{c.tp}pp{c.pp}"


def parse_run(name: str, vllm_system: str = "vllm", distserve_system: str = "distserve") -> Run:
    """The system, layout and profile of a trace from its name (``vllm-N-R``, ``distserve-cPQdRS-N-R``)."""
    if m := re.fullmatch(r"vllm-(\d+)-(\d+(?:\.\d+)?)", name):
        cfg = system_config(vllm_system, colocated=(InstanceSpec(1, 1),))
        return Run(name, vllm_system, "a100-opt-13b-vllm", cfg, int(m[1]), float(m[2]))
    if m := re.fullmatch(r"distserve-c(\d)(\d)d(\d)(\d)-(\d+)-(\d+(?:\.\d+)?)", name):
        p, q, r, s = (int(m[i]) for i in range(1, 5))
        cfg = system_config(distserve_system, prefill=(InstanceSpec(p, q),), decode=(InstanceSpec(r, s),))
        return Run(name, distserve_system, "a100-opt-13b", cfg, int(m[5]), float(m[6]))
    raise ValueError(f"trace {name!r}: expected vllm-N-R or distserve-cPQdRS-N-R (DistServe's run names)")


def _rmse(xs: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in xs) / len(xs)) if xs else math.nan


def _rel(sim: float, real: float) -> float:
    return (sim - real) / real if real else math.nan


def compare_dir(traces: Path, slo: tuple[float, float], vllm_system: str = "vllm",
                distserve_system: str = "distserve") -> dict[str, Any]:
    """Every trace in ``traces`` replayed and compared; rows sorted by system, then requests and rate."""
    files = sorted(p for p in traces.iterdir() if p.suffix in TRACE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{traces}: no traces (*.jsonl, *.exp)")
    rows = []
    profiles: dict[str, Any] = {}
    configs: dict[str, Any] = {}
    for f in files:
        run = parse_run(f.stem, vllm_system, distserve_system)
        trace = read_trace(f)
        if not trace.measured:
            raise ValueError(f"{f}: the trace has no measured ttft_s/tpot_s to compare with")
        prof = profiles.setdefault(run.profile, load_profile(run.profile))
        res = compare(trace, prof, run.cfg, slo)
        configs.setdefault(run.system, {"profile": run.profile, "config": dataclasses.asdict(run.cfg)})
        s, t = res["sim"], res["trace"]
        rows.append({"run": run.name, "system": run.system, "layout": run.layout, "profile": run.profile,
                     "requests": res["requests"], "rate": run.rate, "sim": s, "real": t,
                     "attainment_diff": s["attainment_pct"] - t["attainment_pct"],
                     "ttft_p50_rel": _rel(s["ttft_p50_s"], t["ttft_p50_s"]),
                     "tpot_p50_rel": _rel(s["tpot_p50_s"], t["tpot_p50_s"])})
    rows.sort(key=lambda r: (r["system"], r["requests"], r["rate"]))
    systems = sorted({r["system"] for r in rows})
    return {"slo": list(slo), "traces": str(traces), "runs": rows,
            "rmse_attainment": _rmse([r["attainment_diff"] for r in rows]),
            "rmse_attainment_by_system": {s: _rmse([r["attainment_diff"] for r in rows if r["system"] == s])
                                          for s in systems},
            "systems": configs}


def print_table(res: dict[str, Any]) -> None:
    head = (f"{'run':<27}{'layout':<22}{'attain real/sim':>16}{'diff':>7}  {'TTFT p50 real/sim':>18}"
            f"{'p90 real/sim':>15}  {'TPOT p50 real/sim':>18}{'p90 real/sim':>13}{'TTFT50':>8}{'TPOT50':>8}")
    print(f"SLO TTFT {res['slo'][0]} s, TPOT {res['slo'][1]} s; latencies in ms; last two: p50 sim vs real")
    print(head)
    print("-" * len(head))
    for r in res["runs"]:
        a, b = r["real"], r["sim"]
        ms = lambda k: f"{1e3 * a[k]:.0f}/{1e3 * b[k]:.0f}"  # noqa: E731
        print(f"{r['run']:<27}{r['layout']:<22}{a['attainment_pct']:>8.1f}/{b['attainment_pct']:<7.1f}"
              f"{r['attainment_diff']:>+7.1f}  {ms('ttft_p50_s'):>18}{ms('ttft_p90_s'):>15}  "
              f"{ms('tpot_p50_s'):>18}{ms('tpot_p90_s'):>13}{100 * r['ttft_p50_rel']:>+7.0f}%{100 * r['tpot_p50_rel']:>+7.0f}%")
    per = ", ".join(f"{s} {v:.1f}" for s, v in res["rmse_attainment_by_system"].items())
    print(f"RMSE of attainment: {res['rmse_attainment']:.1f} points over {len(res['runs'])} runs ({per})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traces", default=str(DEFAULT_TRACES), help="folder of traces named vllm-N-R / distserve-cPQdRS-N-R")
    p.add_argument("--out", default="bench/results/sim-vs-real-a100-opt13b.json", help="JSON result ('' to skip)")
    p.add_argument("--slo", default="opt-13b-sharegpt-ablation", help="preset or 'TTFT,TPOT' seconds")
    p.add_argument("--vllm-system", default="vllm", help="system preset for the vLLM runs")
    p.add_argument("--distserve-system", default="distserve", help="system preset for the DistServe runs")


def main(args: argparse.Namespace) -> int:
    from distllm_jax.workload.slo import resolve

    slo = resolve(args.slo)
    res = compare_dir(Path(args.traces), (slo.ttft, slo.tpot), args.vllm_system, args.distserve_system)
    print_table(res)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=lambda x: None))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    raise SystemExit(main(ap.parse_args()))
