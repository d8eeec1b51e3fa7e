"""The paper's end-to-end Figures 8 (chatbot: OPT-13B, 66B, 175B on ShareGPT) and 9 (code completion
on HumanEval, summarisation on LongBench-like, OPT-66B), in simulation from the A100 profiles
(``distllm simulate --figure 8|9``). Real several-GPU runs wait for several-GPU machines; until then
the comparison is made as Figure 11's is, on a CPU, with each system's own engine and policies.

The three systems, each as the paper ran it on its testbed (4 nodes x 8 A100-80GB, 25 Gbps between
nodes, NVLink inside a node):

- **DistServe**: the best unit of Algorithm 2 (low node affinity: the paper's testbed has slow
  cross-node links, so a layer segment's prefill and decode tensor groups share a node and the KV
  moves over NVLink), enumerated by :func:`~distllm_jax.placement.search.low_affinity_units` and
  picked by per-GPU goodput; DistServe's policies (system ``distserve``) on DistServe's fitted engine
  (``a100-opt-*``), KV transfer at the intra-node bandwidth.
- **vLLM**: one colocated instance, pipeline degree 1, tensor degree 1 / 4 / 8 for 13B / 66B / 175B
  (the paper's), vLLM's policies (system ``vllm``) on vLLM's fitted engine (``a100-opt-*-vllm``).
- **DeepSpeed-MII**: chunked prefill (SplitFuse) on one instance of the same tensor degree as vLLM,
  MII's limits (system ``mii``); mixed steps are timed from the prefill and decode fits
  (``SimConfig.mixed_s``), not from a fit of MII's own. None at 175B: the paper had no MII run there.

Which latency model MII runs on: DistServe's, not vLLM's. Neither fit is MII's; vLLM's carries
vLLM's per-step Python overheads (the camera-ready simulator's x1.4 prefill, x1.2 decode), while
DeepSpeed-FastGen publishes itself as faster than vLLM per step. On DistServe's fit, MII and
DistServe run the same kernels' costs, so the ratio over MII isolates what the paper attributes it
to (prefill-decode interference under SplitFuse against disaggregation), and it errs towards MII: a
ratio over MII that reaches the paper's is not owed to a slower engine.

Extrapolated, and said so in the output: OPT-175B has only DistServe's TP-8 fit (itself scaled from
66B, ``a100-opt-175b``); its TP-2/3/4 fits, which Algorithm 2 needs (two tensor groups share a node),
scale that fit term by term by OPT-66B's TP-k / TP-8 ratio of the same term (:func:`scaled_profile`);
vLLM at 175B (no vLLM fit) scales it by OPT-66B's vLLM / DistServe ratio at TP 8. LongBench is
LongBench-like (``distllm_jax/workload/datasets.py``).

Measured per system: per-GPU goodput at 90 % attainment (bracket by halving or doubling a rate,
then bisection to 4 %; the search prunes a unit that misses 90 % at the best goodput so far), the
attainment at per-GPU rates that are fixed fractions of DistServe's goodput, and attainment vs SLO
scale at one per-GPU rate an entry (vLLM's goodput: the load at which the baseline just meets the SLO;
where vLLM misses 90 % at every rate tried, the lightest load tried), with each system's tightest scale (exact, from each request's TTFT and
TPOT). Ratios: DistServe's per-GPU goodput over the baseline's; the baseline's tightest SLO scale over
DistServe's, both at the baseline's own goodput (each comparison at the load where that baseline just
meets the SLO, or its lightest load tried; the panel's rate is vLLM's, so the ratio over MII is read
at MII's goodput instead);
null where the paper had no such run or the ratio is undefined (the notes say which).
Every simulation of an entry is ``requests`` requests (300 by default), or more where the arrivals
would span under 10 TTFT targets, with Poisson arrivals, seed 0.
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
from distllm_jax.placement.ablation import (AblationSpec, Layout, Runner, draw_panels, goodput_bracket, grid_bracket,
                                            save_figure)
from distllm_jax.placement.latency import Fit, Profile, load_profile
from distllm_jax.placement.search import Cluster, low_affinity_units
from distllm_jax.placement.systems import system_overrides

PAPER_CLUSTER = Cluster(nodes=4, gpus_per_node=8, cross_node_gbps=3.125, intra_node_gbps=300.0)
CURVE_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)  # per-GPU rates of the curves, x DistServe's goodput
SLO_SCALES = (0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0)
SCALE_TICKS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
RATIO_KEYS = ("rate_ratio_vs_vllm", "slo_ratio_vs_vllm", "rate_ratio_vs_mii", "slo_ratio_vs_mii")
BASELINES = {"vLLM": "vllm", "DeepSpeed-MII": "mii"}  # system name -> suffix of its ratio keys

# OSDI'24 final version, section 6.2 (../shared/ANCHORS.md): ratios at 90 % attainment. The chatbot
# claims are ranges over OPT-13B/66B/175B; MII has no 175B run.
CHATBOT = {"rate_ratio_vs_vllm": [2.0, 4.6], "slo_ratio_vs_vllm": [1.8, 3.2],
           "rate_ratio_vs_mii": [1.6, 7.4], "slo_ratio_vs_mii": [1.7, 1.8]}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model x workload of a figure, with the paper's vLLM tensor degree and claims."""

    model: str  # opt-13b | opt-66b | opt-175b
    workload: str  # chatbot | code | summarisation
    dataset: str
    slo: str  # preset of distllm_jax/workload/slo.py
    vllm_tp: int
    mii: bool  # whether the paper ran DeepSpeed-MII here
    paper: dict[str, float | list[float] | None]

    @property
    def name(self) -> str:
        return f"{self.model}-{self.workload}"


FIGURES: dict[int, tuple[Entry, ...]] = {
    8: (Entry("opt-13b", "chatbot", "sharegpt-artifact", "opt-13b-sharegpt", 1, True, CHATBOT),
        Entry("opt-66b", "chatbot", "sharegpt-artifact", "opt-66b-sharegpt", 4, True, CHATBOT),
        Entry("opt-175b", "chatbot", "sharegpt-artifact", "opt-175b-sharegpt", 8, False,
              {**CHATBOT, "rate_ratio_vs_mii": None, "slo_ratio_vs_mii": None})),
    9: (Entry("opt-66b", "code", "humaneval", "opt-66b-humaneval", 4, True,
              {"rate_ratio_vs_vllm": 5.7, "slo_ratio_vs_vllm": 1.4, "rate_ratio_vs_mii": 1.6, "slo_ratio_vs_mii": 1.4}),
        Entry("opt-66b", "summarisation", "longbench", "opt-66b-longbench", 4, True,
              {"rate_ratio_vs_vllm": 4.3, "slo_ratio_vs_vllm": 12.6, "rate_ratio_vs_mii": 1.8,
               "slo_ratio_vs_mii": 2.6})),
}


def scaled_fit(base: Fit, num: Fit, den: Fit) -> Fit:
    """``base`` with each coefficient times num's / den's same coefficient (1 where den's is 0); the
    threshold, overheads and pipeline hop stay base's. A negative ratio would flip a term's sign, so
    it is refused rather than extrapolated."""

    def terms(b, n, d):
        out = []
        for x, y, z in zip(b, n, d):
            r = 1.0 if z == 0 else y / z
            if r < 0:
                raise ValueError(f"scaling ratio {y}/{z} is negative: no extrapolation by it")
            out.append(x * r)
        return tuple(out)

    return dataclasses.replace(base, prefill=terms(base.prefill, num.prefill, den.prefill),
                               decode_small=terms(base.decode_small, num.decode_small, den.decode_small),
                               decode_large=terms(base.decode_large, num.decode_large, den.decode_large))


def scaled_profile(base: Profile, base_tp: Callable[[int], int], num: Profile, den: Profile,
                   den_tp: Callable[[int], int], tps: Sequence[int], why: str) -> Profile:
    """A profile with fits at ``tps``: ``base``'s fit at base_tp(tp) scaled by num's fit at tp over
    den's at den_tp(tp) (:func:`scaled_fit`); its source says EXTRAPOLATED and how."""
    fits = {tp: scaled_fit(base.fit(base_tp(tp)), num.fit(tp), den.fit(den_tp(tp))) for tp in tps}
    return dataclasses.replace(base, fits=fits, source=f"EXTRAPOLATED: {why} Base: {base.source}")


def profiles_for(model: str) -> tuple[Profile, Profile, list[str]]:
    """(DistServe's profile, vLLM's profile, what was extrapolated) for a model; 175B is derived from
    the shipped 175B TP-8 fit and OPT-66B's ratios (module docstring)."""
    if model != "opt-175b":
        return load_profile(f"a100-{model}"), load_profile(f"a100-{model}-vllm"), []
    base, ds66, vl66 = load_profile("a100-opt-175b"), load_profile("a100-opt-66b"), load_profile("a100-opt-66b-vllm")
    tps = sorted(ds66.fits)
    ds = scaled_profile(base, lambda tp: 8, ds66, ds66, lambda tp: 8, tps,
                        "each OPT-175B TP-k fit is the TP-8 fit times OPT-66B's TP-k / TP-8 ratio, term by term.")
    vl = scaled_profile(ds, lambda tp: tp, vl66, ds66, lambda tp: tp, [8],
                        "vLLM's OPT-175B TP-8 fit is DistServe's times OPT-66B's vLLM / DistServe ratio at TP 8, "
                        "term by term.")
    notes = ["opt-175b: DistServe's fits at TP 2/3/4 are the extrapolated TP-8 fit scaled by OPT-66B's TP-k/TP-8 "
             "ratios; the TP-8 fit itself is extrapolated from 66B (a100-opt-175b)",
             "opt-175b: vLLM's TP-8 fit is DistServe's scaled by OPT-66B's vLLM/DistServe ratio at TP 8 (no vLLM "
             "175B profile exists)"]
    return ds, vl, notes


def rate_ratio(distserve: float, baseline: float | None) -> float | None:
    """DistServe's per-GPU goodput over the baseline's; None when the baseline was not run or never
    reaches the target (an unbounded ratio is not a number to put beside the paper's)."""
    if baseline is None or baseline <= 0 or not math.isfinite(distserve) or not math.isfinite(baseline):
        return None
    return distserve / baseline


def slo_ratio(distserve_scale: float, baseline_scale: float | None) -> float | None:
    """The baseline's tightest SLO scale over DistServe's (how much tighter an SLO DistServe meets at
    the same rate); None when either never reaches the target at any scale, or was not run."""
    if baseline_scale is None or not math.isfinite(baseline_scale) or not math.isfinite(distserve_scale) \
            or distserve_scale <= 0:
        return None
    return baseline_scale / distserve_scale


def ratios(systems: dict[str, dict], tightest: dict[str, tuple[float, float]]) -> dict[str, float | None]:
    """The four ratio keys from the systems' goodputs and, by baseline, (DistServe's, the baseline's)
    tightest SLO scales at the rate the baseline is compared at (missing baseline: None)."""
    ds = systems["DistServe"]
    out: dict[str, float | None] = {}
    for name, key in BASELINES.items():
        base = systems.get(name)
        ds_scale, base_scale = tightest.get(name, (math.inf, None))
        out[f"rate_ratio_vs_{key}"] = rate_ratio(ds["per_gpu_goodput"], base and base["per_gpu_goodput"])
        out[f"slo_ratio_vs_{key}"] = slo_ratio(ds_scale, base_scale)
    return out


def bracket_around(attain: Callable[[float], float], r0: float, target: float, cap: float,
                   floor: float) -> tuple[float, float]:
    """(lo, hi) per-GPU rates passing / failing the target, from ``r0``: doubling while it passes
    (:func:`grid_bracket` from r0), halving while it fails down to ``floor`` (then lo is 0). Starting
    near the answer matters: a simulation at a rate far below the knee runs batches of one or two
    requests, so it has the most steps and takes the longest."""
    if attain(r0) >= target:
        return grid_bracket(attain, (r0,), target, cap)
    hi = r0
    while hi / 2 >= floor:
        if attain(hi / 2) >= target:
            return hi / 2, hi
        hi /= 2
    return 0.0, hi


def goodput_from(runner: Runner, layout: Layout, r0: float, brackets: dict[Layout, tuple[float, float]]
                 ) -> tuple[float, float]:
    """The layout's goodput bracket, found from ``r0`` (:func:`bracket_around`, down to r0 / 64) and
    bisected; a layout that misses the target at every rate tried keeps (0, lowest rate): its
    goodput is below what the search resolves, not a number found by halving towards zero."""
    spec = runner.spec
    brackets[layout] = bracket_around(lambda r: runner.attainment(layout, r), r0, spec.target,
                                      spec.max_per_gpu_rate, r0 / 64)
    return goodput_bracket(runner, layout, brackets) if brackets[layout][0] > 0 else brackets[layout]


def best_unit(runner: Runner, candidates: Sequence[Layout], r0: float,
              brackets: dict[Layout, tuple[float, float]]) -> tuple[Layout, dict[str, dict]]:
    """The candidate of the highest per-GPU goodput (fewest GPUs on a tie). Fewest GPUs first; a
    candidate is simulated once at the best goodput so far and dropped if it misses the target
    there (attainment falls with rate), else bracketed upward from it and bisected. Returns the
    unit and what each candidate showed."""
    spec = runner.spec
    best, best_g, tried = None, 0.0, {}
    for l in sorted(candidates, key=lambda l: l.gpus):
        attain = lambda r: runner.attainment(l, r)  # noqa: E731
        if best is not None and best_g > 0:
            at_best = attain(best_g)
            if at_best < spec.target:
                tried[l.name] = {"gpus": l.gpus, "attainment_at_best_pct": 100 * at_best}
                continue
            brackets[l] = grid_bracket(attain, (best_g,), spec.target, spec.max_per_gpu_rate)
            lo, hi = goodput_bracket(runner, l, brackets)
        else:
            lo, hi = goodput_from(runner, l, r0, brackets)
        tried[l.name] = {"gpus": l.gpus, "per_gpu_goodput_bracket": [lo, hi]}
        if best is None or lo > best_g:
            best, best_g = l, lo
    if best is None:
        raise ValueError("no placement candidate")
    return best, tried


def system_result(runner: Runner, layout: Layout, brackets: dict, system: str, profile: str,
                  rates: Sequence[float], slo_rate: float, scales: Sequence[float]) -> dict:
    """One system's curves, goodput and tightest scale, as the figure JSON carries them."""
    return {
        "layout": layout.name, "mode": layout.mode, "gpus": layout.gpus, "system": system, "profile": profile,
        "per_gpu_goodput": brackets[layout][0], "per_gpu_goodput_bracket": list(brackets[layout]),
        "attainment_by_per_gpu_rate": {r: 100 * runner.attainment(layout, r) for r in rates},
        "attainment_by_slo_scale": {s: 100 * runner.attainment(layout, slo_rate, s) for s in scales},
        "tightest_slo_scale": runner.tightest_scale(layout, slo_rate),
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def strict_json(obj: object) -> object:
    """``obj`` with every infinite or NaN float as None (strict JSON has neither; a goodput bracket
    open at the top, or a scale no SLO reaches, reads as null)."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def run_entry(entry: Entry, lengths: Sequence[tuple[int, int]], requests: int = 300, span_ttft: float = 10.0,
              cluster: Cluster = PAPER_CLUSTER, profiles: tuple[Profile, Profile] | None = None) -> dict:
    """Search, sweep and compare one model x workload; JSON-able. Each simulation has ``requests``
    requests, or more so that its arrivals span ``span_ttft`` TTFT targets (AblationSpec.min_span_ttft:
    with LongBench's 15 s a 300-request burst drains inside the target and hides an overload).
    ``profiles``: (DistServe's, vLLM's) instead of the A100 ones (tests)."""
    from distllm_jax.workload.slo import resolve

    t0 = time.time()
    if profiles is None:
        ds_prof, vl_prof, notes = profiles_for(entry.model)
    else:
        (ds_prof, vl_prof), notes = profiles, []
    extrapolated = notes[:]
    slo = resolve(entry.slo)
    spec = AblationSpec(total_gpus=cluster.nodes * cluster.gpus_per_node, requests_per_gpu=0, min_requests=requests,
                        slo=(slo.ttft, slo.tpot), slo_scales=SLO_SCALES, rate_tol=0.0, rate_rel_tol=0.04,
                        min_span_ttft=span_ttft,
                        nodes=cluster.nodes, gpus_per_node=cluster.gpus_per_node)
    sims = {"DistServe": ("distserve", ds_prof, {**system_overrides("distserve", "disaggregated"),
                                                  "transfer_gbps": cluster.intra_node_gbps}),
            "vLLM": ("vllm", vl_prof, system_overrides("vllm", "colocated"))}
    if entry.mii:
        sims["DeepSpeed-MII"] = ("mii", ds_prof, system_overrides("mii", "chunked"))
    runners = {k: Runner(prof, lengths, spec, sim) for k, (_, prof, sim) in sims.items()}
    units = [Layout(p, d) for p, d in low_affinity_units(ds_prof, cluster)]
    if not units:
        raise ValueError(f"{entry.model}: no Algorithm 2 unit fits a node of {cluster.gpus_per_node} GPUs")
    brackets: dict[Layout, tuple[float, float]] = {}
    unit, tried = best_unit(runners["DistServe"], units, 1.0, brackets)
    layouts = {"DistServe": unit, "vLLM": Layout(colocated=InstanceSpec(entry.vllm_tp, 1))}
    if entry.mii:
        layouts["DeepSpeed-MII"] = Layout(colocated=InstanceSpec(entry.vllm_tp, 1), chunked=True)
    ds_good = brackets[unit][0]
    for name in [k for k in layouts if k != "DistServe"]:
        goodput_from(runners[name], layouts[name], ds_good / 2 if ds_good > 0 else 1.0, brackets)  # ratios 1.6-7.4
    goods = {k: brackets[l][0] for k, l in layouts.items()}
    slo_rates, tightest = {}, {}
    for name in [k for k in BASELINES if k in layouts]:
        slo_rates[name] = goods[name]
        if goods[name] <= 0:  # compare the SLO at the lightest load tried instead
            slo_rates[name] = min(runners[name].simulated(layouts[name]))
            notes.append(f"{name} misses 90 % at every per-GPU rate down to {slo_rates[name]:.3g}: no rate ratio; "
                         f"the SLO ratio over it is taken at that rate")
        tightest[name] = (runners["DistServe"].tightest_scale(unit, slo_rates[name]),
                          runners[name].tightest_scale(layouts[name], slo_rates[name]))
    slo_rate = slo_rates["vLLM"]
    top = ds_good if ds_good > 0 else slo_rate
    rates = [round(f * top, 6) for f in CURVE_FRACTIONS]
    label = {"DistServe": f"a100-{entry.model}", "DeepSpeed-MII": f"a100-{entry.model}",
             "vLLM": f"a100-{entry.model}-vllm"}
    if profiles is not None:
        label = {k: sims[k][1].model for k in sims}
    elif extrapolated:
        label = {k: v + " (extrapolated)" for k, v in label.items()}
    systems = {k: system_result(runners[k], l, brackets, sims[k][0], label[k], rates, slo_rate, SLO_SCALES)
               for k, l in layouts.items()}
    out_ratios = ratios(systems, tightest)
    for key in RATIO_KEYS:
        if entry.paper.get(key) is None:
            out_ratios[key] = None  # the paper had no such run
        elif out_ratios[key] is None:
            notes.append(f"{key}: undefined (the baseline never reaches 90 % "
                         f"{'at any rate tried' if key.startswith('rate') else 'at any SLO scale'})")
    return strict_json({"name": entry.name, "model": entry.model, "workload": entry.workload, "dataset": entry.dataset,
            "slo_preset": entry.slo, "slo": [slo.ttft, slo.tpot], "requests_per_simulation": requests,
            "min_span_ttft_targets": span_ttft,
            "mean_prompt_len": float(np.mean([p for p, _ in lengths])),
            "mean_output_len": float(np.mean([o for _, o in lengths])),
            "placement": {"algorithm": "algorithm2-low-affinity", "unit": unit.name, "gpus": unit.gpus,
                          "candidates": len(units), "tried": tried,
                          "cluster": dataclasses.asdict(cluster)},
            "slo_scale_rate": slo_rate, "systems": systems,
            "slo_ratio_rates": slo_rates,
            "tightest_slo_scales_at_slo_ratio_rates": tightest, **out_ratios, "paper": entry.paper,
            "extrapolated": extrapolated, "notes": notes,
            "simulations": sum(r.simulations for r in runners.values()), "seconds": round(time.time() - t0, 1)})


def _fmt(x: float | list[float] | None) -> str:
    if x is None:
        return "—"
    if isinstance(x, list):
        return f"{x[0]:g}–{x[1]:g}x"
    return f"{x:.2f}x"


def table(entries: Sequence[dict]) -> str:
    """Markdown: each ratio of ours beside the paper's claim."""
    head = "| model × workload | DistServe unit | " + " | ".join(f"{k} (ours / paper)" for k in RATIO_KEYS) + " |"
    rows = [head, "|" + "---|" * (2 + len(RATIO_KEYS))]
    for e in entries:
        rows.append(f"| {e['name']} | {e['placement']['unit']} | "
                    + " | ".join(f"{_fmt(e[k])} / {_fmt(e['paper'].get(k))}" for k in RATIO_KEYS) + " |")
    return "\n".join(rows)


def plot(entries: Sequence[dict], path: Path, title: str) -> None:
    """One column an entry: attainment vs per-GPU rate above, vs SLO scale below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(entries), figsize=(5.5 * len(entries), 8), squeeze=False)
    for j, e in enumerate(entries):
        draw_panels(axes[0][j], axes[1][j], e["systems"], 0.9, e["slo_scale_rate"])
        axes[0][j].set_title(f"{e['name']} ({e['dataset']}), SLO ({e['slo'][0]:g}s, {e['slo'][1]:g}s)", fontsize=9)
        axes[1][j].set_xscale("log")
        axes[1][j].set_xticks(SCALE_TICKS, [f"{t:g}" for t in SCALE_TICKS])
        axes[1][j].minorticks_off()
    save_figure(fig, path, title, 100)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Figure 8/9 flags on ``distllm simulate`` (with --figure)."""
    p.add_argument("--figure", type=int, choices=sorted(FIGURES), default=None,
                   help="the paper's end-to-end Figure 8 (chatbot) or 9 (code, summarisation) from the A100 profiles")
    p.add_argument("--figure-requests", type=int, default=300,
                   help="figure: requests in each simulation (Poisson arrivals at the per-GPU rate x the layout's GPUs)")
    p.add_argument("--figure-span-ttft", type=float, default=10.0,
                   help="figure: more requests where needed so the arrivals span this many TTFT targets (0: off)")


def run_figure(args: argparse.Namespace) -> int:
    """``distllm simulate --figure 8|9``: prints the ratio table, writes figure{8,9}.{png,json}.
    ``--dataset`` given explicitly replaces every entry's dataset (a quick look, or a test)."""
    from distllm_jax.workload.datasets import opt_lengths

    t0 = time.time()
    results, pools = [], {}
    for entry in FIGURES[args.figure]:
        ds = args.dataset or entry.dataset
        if ds not in pools:
            pools[ds] = opt_lengths(ds, args.num_prompts, args.max_len, args.seed)
        results.append(run_entry(dataclasses.replace(entry, dataset=ds), pools[ds], args.figure_requests,
                                 args.figure_span_ttft))
        e = results[-1]
        print(f"{e['name']}: "
              + ", ".join(f"{k} {s['layout']} {s['per_gpu_goodput']:.3g}" for k, s in e["systems"].items())
              + f" req/s/GPU; {e['simulations']} simulations, {e['seconds']:.0f}s", flush=True)
    out = Path(args.out_dir)
    doc = {"figure": args.figure, "cluster": dataclasses.asdict(PAPER_CLUSTER), "entries": results,
           "workload_pool": args.num_prompts, "seed": args.seed, "seconds": round(time.time() - t0, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"figure{args.figure}.json").write_text(json.dumps(doc, indent=1))
    plot(results, out / f"figure{args.figure}.png",
         f"Figure {args.figure} in simulation (A100 profiles; DistServe: Algorithm 2 on 4 x 8 A100, vLLM and MII "
         f"at the paper's tensor degree); x: goodput at 90 %")
    print(table(results))
    print(f"{sum(e['simulations'] for e in results)} simulations in {doc['seconds']:.0f}s; "
          f"wrote {out}/figure{args.figure}.png and .json")
    return 0
