"""The paper's Figure 11 ablation, run the way DistServe's artifact runs it
(``simdistserve/benchmarks/figure11-abalation/01-run_abalation.sh opt_13b_sharegpt`` on branch
``feat-add-simulator``), over this project's simulator.

What the artifact does, and so what this does:

- **Layouts.** Every disaggregated layout of *one* prefill instance and *one* decode instance with
  tp, pp in {1, 2, 4, 8} for each and at most 4 GPUs in all (``--gpus 32``: at most 32), and every
  colocated layout tp, pp in {1, 2, 4, 8} with tp·pp <= the GPUs. The prefill:decode instance ratio
  is always 1:1; a layout never replicates an instance to balance the phases.
- **Workload.** A layout of g GPUs gets 100·g requests (lengths from the dataset) and Poisson arrivals
  at g × the per-GPU rate, seeded 0; per-GPU rates 1-5 req/s; SLO TTFT 0.2 s, TPOT 0.1 s.
- **Attainment.** The share of *all* requests whose TTFT <= the TTFT target *and* TPOT <= the TPOT
  target, each request judged on both (the artifact's ``pd == "both"`` rows), not the P90 of each
  metric separately.
- **Systems.** DistServe-High: the best disaggregated layout. DistServe-Low: the best one with low
  node affinity, the artifact's rule (:func:`low_affinity`). vLLM++: the best colocated layout.
  vLLM: colocated, pipeline degree 1, the smallest tensor degree the model fits (tp 1 for OPT-13B).
- **SLO-scale panel.** The chosen layouts at per-GPU rate 2 with both targets scaled by 0.4-1.2.

Where this differs, and why: the artifact only tabulates attainment at the five rates, reads
goodput@90 as "the rate if attainment >= 90 % there, else 0", and picks each system's layout as the
one with the highest attainment at the *highest* rate tried (``--pick artifact`` does exactly that).
The default ``--pick goodput`` picks the layout with the highest per-GPU goodput, found by bisection
on the per-GPU rate inside the bracket the grid gives; that is the quantity the paper plots and
compares, and the two picks agree whenever curves do not cross. Only what a pick needs is simulated:
a layout's grid stops at its first rate below 90 %, and a layout whose bracket cannot beat the best
goodput found so far is not refined.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.latency import PROFILES, Profile
from distllm_jax.placement.systems import system_overrides
from distllm_jax.placement.simulator import SimConfig, simulate

DEGREES = (1, 2, 4, 8)  # the artifact's --tp-prefill/--pp-prefill/--tp-decode/--pp-decode lists
ARTIFACT_RATES = (1.0, 2.0, 3.0, 4.0, 5.0)  # per_gpu_rate for opt_13b_sharegpt (and its 32-GPU run)
ARTIFACT_SLO_SCALES = (0.4, 0.6, 0.8, 1.0, 1.2)  # 03-draw_slo_abalation.py's slos
SYSTEMS = ("DistServe-High", "DistServe-Low", "vLLM++", "vLLM")
PICKS = ("goodput", "artifact")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One prefill + one decode instance (disaggregated) or one colocated instance; ``chunked``: the
    colocated instance mixes prompt chunks into decode steps (SplitFuse, DeepSpeed-MII's way)."""

    prefill: InstanceSpec | None = None
    decode: InstanceSpec | None = None
    colocated: InstanceSpec | None = None
    chunked: bool = False

    @property
    def disaggregated(self) -> bool:
        return self.colocated is None

    @property
    def gpus(self) -> int:
        if self.disaggregated:
            return self.prefill.num_devices + self.decode.num_devices
        return self.colocated.num_devices

    @property
    def name(self) -> str:
        if self.disaggregated:
            return f"P-tp{self.prefill.tp}pp{self.prefill.pp}/D-tp{self.decode.tp}pp{self.decode.pp}"
        return f"tp{self.colocated.tp}pp{self.colocated.pp}" + ("-chunked" if self.chunked else "")

    @property
    def mode(self) -> str:
        return "disaggregated" if self.disaggregated else "chunked" if self.chunked else "colocated"

    def config(self, **sim: object) -> SimConfig:
        if self.disaggregated:
            return SimConfig("disaggregated", (self.prefill,), (self.decode,), **sim)
        sim = {k: v for k, v in sim.items() if k != "transfer_gbps"}
        return SimConfig(self.mode, colocated=(self.colocated,), **sim)


@dataclasses.dataclass(frozen=True)
class AblationSpec:
    """The artifact's ``opt_13b_sharegpt`` settings; ``total_gpus=32`` is its ``_32gpu`` variant."""

    total_gpus: int = 4
    per_gpu_rates: tuple[float, ...] = ARTIFACT_RATES
    requests_per_gpu: int = 100  # base_N: a layout of g GPUs gets 100·g requests
    slo: tuple[float, float] = (0.2, 0.1)  # prefill_target 200 ms, decode_target 100 ms
    slo_scales: tuple[float, ...] = ARTIFACT_SLO_SCALES
    slo_scale_rate: float = 2.0  # chosen_per_gpu_rate
    target: float = 0.9
    nodes: int = 4  # max_machine in the artifact's low-affinity check
    gpus_per_node: int = 8  # max_gpu_per_node there
    rate_tol: float = 1 / 32  # bisection stops when the bracket is this narrow (req/s per GPU)
    # ... or this narrow relative to its top (goodputs spanning 0.05-5 req/s per GPU need both)
    rate_rel_tol: float = 0.0
    min_requests: int = 0  # at least this many requests a simulation (a 1-GPU layout's 100 is noisy)
    # ... and enough that the arrivals span this many TTFT targets: a backlog that fits in the TTFT
    # target never shows as misses, so a short run overstates the goodput of a loose target (15 s)
    min_span_ttft: float = 0.0
    max_per_gpu_rate: float = 64.0  # where the upward search gives up (goodput reported as this)
    pick: str = "goodput"
    seed: int = 0


def shapes(profile: Profile, max_gpus: int, degrees: Sequence[int] = DEGREES) -> list[InstanceSpec]:
    """The instance shapes the profile can time and the model fits in, in the artifact's order."""
    return [InstanceSpec(tp, pp) for tp in degrees for pp in degrees
            if tp in profile.fits and profile.num_layers % pp == 0 and tp * pp <= max_gpus
            and profile.fits_memory(tp, pp)]


def layouts(profile: Profile, total_gpus: int) -> tuple[list[Layout], list[Layout]]:
    """(disaggregated, colocated) layouts of at most ``total_gpus`` GPUs, as simulate_multi.py forms them."""
    s = shapes(profile, total_gpus)
    disagg = [Layout(p, d) for p in s for d in s if p.num_devices + d.num_devices <= total_gpus]
    return disagg, [Layout(colocated=c) for c in s]


def low_affinity(layout: Layout, nodes: int = 4, gpus_per_node: int = 8) -> bool:
    """The artifact's ``can_fit_low_affinity_distserve``: some common cross-node pipeline degree k
    (1..nodes) divides both pipeline degrees, and one segment (the prefill's pp/k stages and the
    decode's pp/k stages, so the KV of a layer range never leaves its node) fits in one node. Colocated
    layouts always qualify. With 4 GPUs and 8-GPU nodes every layout qualifies (k = 1)."""
    if not layout.disaggregated:
        return True
    p, d = layout.prefill, layout.decode
    return any(p.pp % k == 0 and d.pp % k == 0 and (p.num_devices + d.num_devices) // k <= gpus_per_node
               for k in range(1, nodes + 1))


def vllm_layout(profile: Profile, colocated: Sequence[Layout]) -> Layout:
    """The paper's vLLM baseline: pipeline degree 1 and the smallest tensor degree that holds the model
    (the artifact hard-codes tp 1 for OPT-13B, 2 for 66B, 4 for 175B)."""
    pp1 = [c for c in colocated if c.colocated.pp == 1]
    if not pp1:
        raise ValueError(f"{profile.model} fits no colocated tp with pipeline degree 1")
    return min(pp1, key=lambda c: c.colocated.tp)


class Runner:
    """Simulates a layout at a per-GPU rate once and keeps each request's (TTFT, TPOT), so the SLO
    scales, the picks and the curves reuse one simulation."""

    def __init__(self, profile: Profile, lengths: Sequence[tuple[int, int]], spec: AblationSpec,
                 sim: dict[str, object]):
        from distllm_jax.workload.arrivals import arrival_times

        if not lengths:
            raise ValueError("the ablation needs at least one (prompt, output) length")
        self._arrivals = arrival_times
        self.profile, self.lengths, self.spec, self.sim = profile, list(lengths), spec, sim
        self._cache: dict[tuple[Layout, float], np.ndarray] = {}
        self.simulations = 0

    def latencies(self, layout: Layout, per_gpu_rate: float) -> np.ndarray:
        """(n, 2) array of TTFT and TPOT in seconds (inf where a request never finished)."""
        key = (layout, float(per_gpu_rate))
        if key not in self._cache:
            rate = per_gpu_rate * layout.gpus
            n = max(self.spec.min_requests, self.spec.requests_per_gpu * layout.gpus,
                    math.ceil(self.spec.min_span_ttft * self.spec.slo[0] * rate))
            lens = [self.lengths[i % len(self.lengths)] for i in range(n)]
            arr = self._arrivals(n, rate, seed=self.spec.seed)
            reqs = simulate(self.profile, layout.config(**self.sim), lens, arr)
            self._cache[key] = np.array([(r.ttft, r.tpot) for r in reqs], dtype=float).reshape(-1, 2)
            self.simulations += 1
        return self._cache[key]

    def attainment(self, layout: Layout, per_gpu_rate: float, scale: float = 1.0) -> float:
        lat = self.latencies(layout, per_gpu_rate)
        ok = (lat[:, 0] <= self.spec.slo[0] * scale) & (lat[:, 1] <= self.spec.slo[1] * scale)
        return float(ok.sum()) / max(1, len(lat))

    def tightest_scale(self, layout: Layout, per_gpu_rate: float) -> float:
        """The smallest SLO scale at which attainment reaches the target (exact: the scale each request
        needs is max(TTFT / TTFT target, TPOT / TPOT target))."""
        lat = self.latencies(layout, per_gpu_rate)
        need = np.sort(np.maximum(lat[:, 0] / self.spec.slo[0], lat[:, 1] / self.spec.slo[1]))
        return float(need[math.ceil(self.spec.target * len(need)) - 1])

    def simulated(self, layout: Layout) -> dict[float, float]:
        """Attainment (%) at every per-GPU rate simulated for this layout so far."""
        return {r: 100 * self.attainment(layout, r) for (l, r) in sorted(self._cache, key=lambda k: k[1])
                if l == layout}


def grid_bracket(attain: Callable[[float], float], grid: Sequence[float], target: float,
                 cap: float) -> tuple[float, float]:
    """(lo, hi) per-GPU rates with attainment >= target at lo and below it at hi, from the grid
    ascending up to its first failure (0 when the first rate fails); when the whole grid passes, the
    rate doubles until it fails or passes ``cap`` (then hi is inf)."""
    lo = 0.0
    for r in sorted(grid):
        if attain(r) < target:
            return lo, r
        lo = r
    while lo * 2 <= cap:
        if attain(lo * 2) < target:
            return lo, lo * 2
        lo *= 2
    return lo, math.inf


def refine(attain: Callable[[float], float], lo: float, hi: float, target: float, tol: float,
           floor: float = -1.0, rel_tol: float = 0.0) -> tuple[float, float]:
    """Bisection of a (lo, hi) bracket down to ``tol`` wide (or ``rel_tol`` of hi); stops early once
    hi <= floor (it cannot beat that goodput). Narrowing a bracket twice costs nothing more than
    narrowing it once."""
    if math.isinf(hi):
        return lo, hi
    while hi - lo > max(tol, rel_tol * hi) and hi > floor:
        mid = (lo + hi) / 2
        if attain(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo, hi


def pick(runner: Runner, candidates: Sequence[Layout], brackets: dict[Layout, tuple[float, float]]) -> Layout:
    """The best of ``candidates`` under ``runner.spec.pick``; goodput brackets land in ``brackets``.

    goodput: highest per-GPU goodput at the target, ties broken by attainment at the highest grid
    rate and then by the artifact's enumeration order. artifact: get_top_config in
    02-draw_rate_abalation.py, highest (goodput@90, attainment) at the highest grid rate."""
    spec = runner.spec
    top = max(spec.per_gpu_rates)
    if not candidates:
        raise ValueError("no layout to pick from")
    if spec.pick == "artifact":
        return max(candidates, key=lambda l: (runner.attainment(l, top) >= spec.target, runner.attainment(l, top)))
    for l in candidates:
        if l not in brackets:
            brackets[l] = grid_bracket(lambda r: runner.attainment(l, r), spec.per_gpu_rates, spec.target,
                                       spec.max_per_gpu_rate)
    best = -1.0
    for l in sorted(candidates, key=lambda l: -brackets[l][0]):
        if brackets[l][1] > best:
            goodput_bracket(runner, l, brackets, best)
        best = max(best, brackets[l][0])
    tied = [l for l in candidates if brackets[l][0] == best]
    return max(tied, key=lambda l: runner.attainment(l, top))


def goodput_bracket(runner: Runner, layout: Layout, brackets: dict[Layout, tuple[float, float]],
                    floor: float = -1.0) -> tuple[float, float]:
    """The layout's per-GPU goodput bracket (grid, then bisection to the spec's tolerance; pruned at
    ``floor``), kept in ``brackets`` so a layout already narrowed is not simulated again."""
    spec = runner.spec
    attain = lambda r: runner.attainment(layout, r)  # noqa: E731
    lo, hi = brackets.get(layout) or grid_bracket(attain, spec.per_gpu_rates, spec.target, spec.max_per_gpu_rate)
    brackets[layout] = refine(attain, lo, hi, spec.target, spec.rate_tol, floor, spec.rate_rel_tol)
    return brackets[layout]


def run(profile: Profile, lengths: Sequence[tuple[int, int]], spec: AblationSpec,
        sim: dict[str, object], colocated_profile: Profile | None = None,
        colocated_sim: dict[str, object] | None = None) -> dict:
    """The four systems' layouts, per-GPU goodputs and curves, and every layout tried, as JSON-able data.

    ``profile``/``sim``: how the disaggregated layouts run (DistServe's engine: its latency model and
    its policies as SimConfig fields); ``colocated_profile``/``colocated_sim``: how the colocated ones
    run (vLLM's), as the artifact simulates each system with its own engine type (default: the same)."""
    if spec.pick not in PICKS:
        raise ValueError(f"pick must be one of {PICKS}, got {spec.pick!r}")
    t0 = time.time()
    co_prof = colocated_profile or profile
    runners = {"disaggregated": Runner(profile, lengths, spec, sim),
               "colocated": Runner(co_prof, lengths, spec, sim if colocated_sim is None else colocated_sim)}
    disagg, _ = layouts(profile, spec.total_gpus)
    _, coloc = layouts(co_prof, spec.total_gpus)
    if not disagg or not coloc:
        raise ValueError(f"{profile.model}: no layout fits in {spec.total_gpus} GPUs")
    candidates = {
        "DistServe-High": disagg,
        "DistServe-Low": [l for l in disagg if low_affinity(l, spec.nodes, spec.gpus_per_node)],
        "vLLM++": coloc,
        "vLLM": [vllm_layout(co_prof, coloc)],
    }
    brackets: dict[Layout, tuple[float, float]] = {}
    systems = {}
    for name in SYSTEMS:
        runner = runners["disaggregated" if name.startswith("DistServe") else "colocated"]
        best = pick(runner, candidates[name], brackets)
        goodput_bracket(runner, best, brackets)
        rates = {r: 100 * runner.attainment(best, r) for r in spec.per_gpu_rates}
        systems[name] = {
            "layout": best.name, "mode": "disaggregated" if best.disaggregated else "colocated", "gpus": best.gpus,
            "per_gpu_goodput": brackets[best][0],
            "per_gpu_goodput_bracket": list(brackets[best]),
            # the artifact's reading: the highest grid rate at >= 90 %
            "grid_per_gpu_goodput": max([r for r, a in rates.items() if a >= 100 * spec.target], default=0.0),
            "attainment_by_per_gpu_rate": rates,
            "attainment_by_slo_scale": {s: 100 * runner.attainment(best, spec.slo_scale_rate, s)
                                        for s in spec.slo_scales},
            "tightest_slo_scale": runner.tightest_scale(best, spec.slo_scale_rate),
            "candidates": len(candidates[name]),
        }
    tried = {l.name: {"gpus": l.gpus, "low_affinity": low_affinity(l, spec.nodes, spec.gpus_per_node),
                      "attainment_by_per_gpu_rate": runners["disaggregated" if l.disaggregated else "colocated"].simulated(l),
                      **({"per_gpu_goodput_bracket": list(brackets[l])} if l in brackets else {})}
             for l in disagg + coloc}
    return {"profile": profile.model, "device": profile.device, "spec": dataclasses.asdict(spec),
            "systems": systems, "layouts": tried, "simulations": sum(r.simulations for r in runners.values()),
            "seconds": round(time.time() - t0, 1)}


def draw_panels(a1, a2, systems: dict[str, dict], target: float, slo_scale_rate: float,
                styles: dict[str, dict] | None = None) -> None:
    """Attainment vs per-GPU rate on ``a1`` (x: each system's goodput at the target) and vs SLO scale
    on ``a2`` (tightest on the right), one curve a system; Figures 8, 9 and 11 draw the same panels."""
    for name, s in systems.items():
        style = (styles or {}).get(name, dict(marker="o"))
        label = f"{name} ({s['layout']}): {s['per_gpu_goodput']:.3g} req/s/GPU"
        rates = [float(r) for r in s["attainment_by_per_gpu_rate"]]
        line, = a1.plot(rates, list(s["attainment_by_per_gpu_rate"].values()), label=label, **style)
        if rates and 0 < s["per_gpu_goodput"] <= max(rates):
            a1.plot([s["per_gpu_goodput"]], [100 * target], marker="x", ms=9, color=line.get_color())
        a2.plot([float(x) for x in s["attainment_by_slo_scale"]], list(s["attainment_by_slo_scale"].values()),
                label=name, **style)
    for ax in (a1, a2):
        ax.axhline(100 * target, color="grey", ls="--", lw=1)
        ax.set_ylim(0, 105)
        ax.set_ylabel("SLO attainment (%)")
        ax.legend(fontsize=7)
    a1.set_xlabel("per-GPU rate (req/s)")
    a2.set_xlabel(f"SLO scale (at {slo_scale_rate:.3g} req/s per GPU)")
    a2.invert_xaxis()


def plot(result: dict, path: Path, title: str) -> None:
    """Figure 11's two panels: attainment vs per-GPU rate, and vs SLO scale (tightest on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result["spec"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    # High and Low often pick the same layout (always, within 4 GPUs): Low dashed, so both show
    draw_panels(a1, a2, result["systems"], spec["target"], spec["slo_scale_rate"],
                {"DistServe-Low": dict(ls="--", marker="s", mfc="none")})
    save_figure(fig, path, title, 110)


def save_figure(fig, path: Path, title: str, dpi: int) -> None:
    """Title, lay out, write the PNG (making its folder) and free the figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ablation's own flags on ``distllm simulate`` (with --ablation)."""
    p.add_argument("--gpus", type=int, default=4, choices=[4, 32],
                   help="ablation: GPUs a layout may use (the artifact's opt_13b_sharegpt or its _32gpu run)")
    p.add_argument("--pick", default="goodput", choices=list(PICKS),
                   help="ablation: each system's layout by per-GPU goodput (bisection), or as the artifact's "
                        "plot script does (highest attainment at the highest rate)")
    p.add_argument("--requests-per-gpu", type=int, default=100,
                   help="ablation: requests per GPU of a layout (the artifact's base_N)")
    p.add_argument("--disaggregated-system", default="distserve",
                   help="ablation: the system whose policies the DistServe layouts run (distllm for this engine's)")
    p.add_argument("--colocated-system", default="vllm",
                   help="ablation: the system whose policies the vLLM layouts run")
    p.add_argument("--colocated-profile", default=None,
                   help="ablation: latency profile of the vLLM layouts (default: <--profile>-vllm where shipped, "
                        "as the artifact times vLLM with vLLM's own fit)")


def run_ablation(args: argparse.Namespace) -> int:
    """``distllm simulate --ablation``: prints the table, writes figure11[-32gpu].{png,json}."""
    from distllm_jax.workload.datasets import opt_lengths
    from distllm_jax.workload.slo import resolve
    from distllm_jax.placement.latency import load_profile

    prof = load_profile(args.profile)
    co_name = args.colocated_profile or (f"{args.profile}-vllm" if (PROFILES / f"{args.profile}-vllm.json").exists()
                                         else args.profile)
    co_prof = load_profile(co_name)
    slo = resolve(args.slo)
    spec = AblationSpec(total_gpus=args.gpus, requests_per_gpu=args.requests_per_gpu, slo=(slo.ttft, slo.tpot),
                        pick=args.pick, seed=args.seed)
    t0 = time.time()
    try:
        lengths = opt_lengths(args.dataset, spec.requests_per_gpu * spec.total_gpus, args.max_len, args.seed)
    except ValueError as e:
        if args.dataset == "sharegpt-artifact":
            raise SystemExit(f"{e}\n(sharegpt-artifact is DistServe's own ShareGPT preparation; until "
                             "distllm_jax/workload/datasets.py has it, pass --dataset sharegpt or --dataset file:PATH)")
        raise
    given = {k: v for k, v in (("prefill_token_budget", args.prefill_token_budget),
                               ("max_decode_batch", args.max_decode_batch)) if v is not None}
    sim = {**system_overrides(args.disaggregated_system, "disaggregated"), **given,
           "transfer_gbps": 100.0 if args.transfer_gbps is None else args.transfer_gbps}
    co_sim = {**system_overrides(args.colocated_system, "colocated"), **given}
    result = run(prof, lengths, spec, sim, co_prof, co_sim)
    result.update(dataset=args.dataset, requests_in_pool=len(lengths),
                  mean_prompt_len=float(np.mean([p for p, _ in lengths])),
                  mean_output_len=float(np.mean([o for _, o in lengths])), sim=sim, colocated_sim=co_sim,
                  systems_run={"DistServe": [args.disaggregated_system, args.profile],
                               "vLLM": [args.colocated_system, co_name]},
                  seconds_with_workload=round(time.time() - t0, 1))
    out = Path(args.out_dir)
    stem = "figure11" if spec.total_gpus == 4 else f"figure11-{spec.total_gpus}gpu"
    plot(result, out / f"{stem}.png",
         f"{prof.model}, {args.dataset} (mean prompt {result['mean_prompt_len']:.0f}, output "
         f"{result['mean_output_len']:.0f}), SLO ({slo.ttft}s, {slo.tpot}s), {spec.total_gpus} GPUs, "
         f"{prof.device}: DistServe as {args.disaggregated_system} ({args.profile}), vLLM as "
         f"{args.colocated_system} ({co_name}); x: goodput at 90 %")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    rates = spec.per_gpu_rates
    print(f"{'system':<16}{'layout':<20}{'goodput/GPU':>12}{'grid':>6}" + "".join(f"{f'@{r:g}':>7}" for r in rates))
    for name, s in result["systems"].items():
        print(f"{name:<16}{s['layout']:<20}{s['per_gpu_goodput']:>12.2f}{s['grid_per_gpu_goodput']:>6g}"
              + "".join(f"{a:>6.0f}%" for a in s["attainment_by_per_gpu_rate"].values()))
    print(f"{result['simulations']} simulations in {result['seconds']:.0f}s "
          f"({result['seconds_with_workload']:.0f}s with the workload); wrote {out / stem}.png and .json")
    return 0
