"""``distllm profile | simulate | place``, the paper's Figure 11 ablation (``distllm simulate --ablation``)
and its end-to-end Figures 8 and 9 in simulation (``distllm simulate --figure 8|9``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",")]


def _common(p: argparse.ArgumentParser, system_limits: bool = False) -> None:
    """Flags of ``simulate`` and ``place``. ``system_limits``: the batch limits default to the chosen
    system's (``simulate --system``; None here) instead of this engine's 512 / 256."""
    p.add_argument("--profile", default="a100-opt-13b", help="shipped profile name or a JSON from `distllm profile`")
    p.add_argument("--dataset", default="sharegpt",
                   help="sharegpt | sharegpt-artifact | humaneval | longbench | file:PATH (simulate --ablation: sharegpt-artifact)")
    p.add_argument("--num-prompts", type=int, default=1000, help="workload size (lengths drawn from the dataset)")
    p.add_argument("--max-len", type=int, default=2048, help="longest prompt + output kept (tokens)")
    p.add_argument("--slo", default="opt-13b-sharegpt-ablation", help="preset or 'TTFT,TPOT' seconds")
    p.add_argument("--seed", type=int, default=0, help="seed for the workload sample and the arrivals")
    p.add_argument("--prefill-token-budget", type=int, default=None if system_limits else 512,
                   help="prompt tokens per prefill batch (default: the system's; 512 for distllm)")
    p.add_argument("--max-decode-batch", type=int, default=None if system_limits else 256,
                   help="sequences per decode batch (default: the system's; 256 for distllm)")


def _par(spec: str):
    """The plan instances of a layout flag, e.g. ``2xtp2p1,tp4``."""
    from distllm_jax.placement.plan import PlanInstance

    import re

    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(?:(\d+)x)?tp(\d+)(?:pp?(\d+))?", part.strip())
        if not m:
            raise ValueError(f"instance spec {part!r}: expected COUNTxtpTpPP, e.g. 2xtp2p1 or tp4")
        out += [PlanInstance(int(m.group(2)), int(m.group(3) or 1))] * int(m.group(1) or 1)
    return tuple(out)


def _sim_config(args):
    """The SimConfig of ``--system`` on the layout flags (a plan of them); flags given explicitly win
    over the preset."""
    from distllm_jax.placement.plan import Plan
    from distllm_jax.placement.systems import SYSTEMS

    system = SYSTEMS[args.system]
    mode = args.mode or system.mode or "disaggregated"
    layout = (dict(prefill=_par(args.prefill), decode=_par(args.decode)) if mode == "disaggregated"
              else dict(colocated=_par(args.colocated)))
    given = {"prefill_token_budget": args.prefill_token_budget, "max_decode_batch": args.max_decode_batch,
             "transfer_gbps": args.transfer_gbps, "admission_s": None if args.admission_ms is None else args.admission_ms / 1e3,
             "step_overhead_s": None if args.step_overhead_ms is None else args.step_overhead_ms / 1e3,
             "host_contention": args.host_contention, "host_contention_decode": args.host_contention_decode}
    return Plan(mode, **layout).to_sim_config(args.system, **{k: v for k, v in given.items() if v is not None})


def cmd_simulate(args) -> int:
    from distllm_jax.workload.datasets import opt_lengths
    from distllm_jax.workload.slo import resolve
    from distllm_jax.placement.latency import load_profile
    from distllm_jax.placement.search import sim_attainment, workload_from

    if args.figure is not None:
        from distllm_jax.placement.figures import run_figure

        args.out_dir = args.out_dir or f"bench/results/figure{args.figure}"
        return run_figure(args)  # each entry's own dataset unless --dataset is given
    args.out_dir = args.out_dir or "bench/results/figure11"
    if args.dataset is None:
        args.dataset = "sharegpt-artifact" if args.ablation else "sharegpt"
    if args.ablation:
        from distllm_jax.placement.ablation import run_ablation

        return run_ablation(args)  # each system with its own policies (flags given override them)
    prof = load_profile(args.profile)
    slo = resolve(args.slo)
    cfg = _sim_config(args)
    if args.trace:
        return _simulate_trace(args, prof, cfg, (slo.ttft, slo.tpot))
    wl = workload_from(opt_lengths(args.dataset, args.num_prompts, args.max_len, args.seed), args.num_prompts, args.seed)
    print(f"{prof.model} on {prof.device}, {cfg.mode} on {cfg.gpus} GPUs, SLO ({slo.ttft}s, {slo.tpot}s)")
    print(f"{'rate':>8}{'per GPU':>9}{'attain':>9}")
    for r in [float(x) for x in args.rates.split(",")]:
        a = sim_attainment(prof, cfg, wl, r, (slo.ttft, slo.tpot))
        print(f"{r:>8g}{r / cfg.gpus:>9.3g}{100 * a:>8.1f}%")
    return 0


def _simulate_trace(args, prof, cfg, slo: tuple[float, float]) -> int:
    """Replay a recorded run's arrivals and lengths; print the simulated summary beside the measured."""
    from distllm_jax.placement.trace import compare, read_trace

    trace = read_trace(args.trace)
    res = compare(trace, prof, cfg, slo)
    layout = " + ".join(f"{len(v)}x tp{v[0].tp}pp{v[0].pp}" for v in
                        ((cfg.prefill, cfg.decode) if cfg.mode == "disaggregated" else (cfg.colocated,)))
    print(f"{trace.name}: {res['requests']} requests, {args.system} ({cfg.mode} {layout}) on {prof.model} "
          f"({args.profile}), SLO ({slo[0]}s, {slo[1]}s)")
    print(f"{'':<8}{'attain':>8}{'TTFT p50':>10}{'p90':>8}{'TPOT p50':>10}{'p90':>8}   (ms)")
    for k in ("sim", "trace"):
        s = res[k]
        if s is None:
            print(f"{k:<8}  (no measurements in the trace)")
            continue
        print(f"{k:<8}{s['attainment_pct']:>7.1f}%{1e3 * s['ttft_p50_s']:>10.1f}{1e3 * s['ttft_p90_s']:>8.1f}"
              f"{1e3 * s['tpot_p50_s']:>10.1f}{1e3 * s['tpot_p90_s']:>8.1f}")
    if args.json:
        print(json.dumps(res))
    return 0


def cmd_place(args) -> int:
    from distllm_jax.workload.datasets import opt_lengths
    from distllm_jax.workload.slo import resolve
    from distllm_jax.placement.latency import load_profile
    from distllm_jax.placement.search import Cluster, algorithm1, algorithm2, colocated_search, workload_from

    prof = load_profile(args.profile)
    slo = resolve(args.slo)
    wl = workload_from(opt_lengths(args.dataset, args.num_prompts, args.max_len, args.seed), args.num_prompts, args.seed)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.cross_node_gbps, args.intra_node_gbps)
    sim = dict(prefill_token_budget=args.prefill_token_budget, max_decode_batch=args.max_decode_batch)
    if args.algorithm == "high":
        # on one node every KV transfer stays inside it
        gbps = args.cross_node_gbps if cluster.nodes > 1 else args.intra_node_gbps
        plan = algorithm1(prof, wl, (slo.ttft, slo.tpot), cluster, args.rate, transfer_gbps=gbps, **sim)
    elif args.algorithm == "low":
        plan = algorithm2(prof, wl, (slo.ttft, slo.tpot), cluster, args.rate, **sim)
    else:
        plan = colocated_search(prof, wl, (slo.ttft, slo.tpot), cluster, args.rate, max_pp=cluster.nodes, **sim)
    limit = cluster.nodes * cluster.gpus_per_node
    print(f"{plan.algorithm}: {prof.model} on {prof.device}, target {args.rate:g} req/s, SLO ({slo.ttft}s, {slo.tpot}s)")
    for k in ("prefill", "decode", "colocated"):
        insts = getattr(plan, k)
        if insts:
            print(f"  {k:<10}{len(insts)} x tp{insts[0].tp} pp{insts[0].pp}")
    print(f"  expected goodput {plan.expected_goodput:.2f} req/s on {plan.gpus} GPUs ({plan.per_gpu_goodput:.3f} per GPU)")
    if plan.gpus > limit:
        print(f"  warning: the plan needs {plan.gpus} GPUs, the cluster has {limit}")
    plan.save(args.out)
    print(f"wrote {args.out} (distllm serve --plan {args.out})")
    return 0


def cmd_profile(args) -> int:
    from distllm_jax.engine import CheckpointSource, DeviceRandomSource, RandomSource
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset
    from distllm_jax.placement.profiler import profile

    import jax

    if args.checkpoint:
        source, name = CheckpointSource(args.checkpoint, args.dtype), Path(args.checkpoint).name
    else:
        dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
        random = DeviceRandomSource if jax.default_backend() == "gpu" else RandomSource  # real sizes: draw on the GPU
        source, name = random(ModelConfig.from_hf_dict(preset(args.preset)), dtype), args.preset
    prof, errors = profile(source, _ints(args.tp), _ints(args.prompt_lens), _ints(args.prompts_per_batch),
                           _ints(args.batches), _ints(args.contexts), repeats=args.repeats, name=name,
                           max_prefill_tokens=args.max_prefill_tokens, max_seq_len=args.max_seq_len)
    out = prof.to_dict()
    out["fit_errors"] = errors
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


def add_commands(sub) -> None:
    from distllm_jax.placement.ablation import add_arguments as add_ablation_arguments
    from distllm_jax.placement.figures import add_arguments as add_figure_arguments
    from distllm_jax.placement.systems import SYSTEMS

    s = sub.add_parser("simulate", help="simulate a configuration over a workload at several rates, or replay a trace")
    _common(s, system_limits=True)
    s.add_argument("--system", default="distllm", choices=list(SYSTEMS),
                   help="the serving system's policies and limits (distllm_jax/placement/systems.py)")
    s.add_argument("--trace", help="replay a recorded run (JSON Lines or DistServe .exp) instead of --rates")
    s.add_argument("--json", action="store_true", help="with --trace: one JSON summary on the last line")
    s.add_argument("--mode", default=None, choices=["disaggregated", "colocated", "chunked"],
                   help="serving mode (default: the system's; disaggregated for distllm)")
    s.add_argument("--prefill", default="1xtp1p1", help="instances, e.g. 2xtp2p1 (count x tp p pp)")
    s.add_argument("--decode", default="1xtp1p1", help="decode instances (disaggregated), as --prefill")
    s.add_argument("--colocated", default="1xtp1p1", help="instances of the colocated / chunked modes, as --prefill")
    s.add_argument("--transfer-gbps", type=float, default=None, help="KV migration bandwidth, GB/s (default 100)")
    s.add_argument("--rates", default="0.5,1,2,4", help="request rates to simulate (req/s), comma list")
    s.add_argument("--admission-ms", type=float, default=None, help="host time before a request can be scheduled (default 0)")
    s.add_argument("--step-overhead-ms", type=float, default=None, help="host bookkeeping added to every step (default 0)")
    s.add_argument("--host-contention", type=float, default=None,
                   help="slowdown of prefill steps that overlap others on a shared host (virtual CPU devices; default 1, GPUs)")
    s.add_argument("--host-contention-decode", type=float, default=None,
                   help="the same for decode steps (default: --host-contention)")
    s.add_argument("--ablation", action="store_true",
                   help="the paper's Figure 11 (OPT-13B, ShareGPT) as DistServe's artifact runs it, instead")
    s.add_argument("--out-dir", default=None,
                   help="where --ablation / --figure write their PNG and JSON (default bench/results/figure11, "
                        "bench/results/figure8 or figure9)")
    add_ablation_arguments(s)
    add_figure_arguments(s)
    s.set_defaults(dataset=None)  # sharegpt, or sharegpt-artifact with --ablation (cmd_simulate)
    s.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("place", help="search the placement (the paper's Algorithms 1 and 2) and write a plan")
    _common(p)
    p.add_argument("--algorithm", default="high", choices=["high", "low", "colocated"],
                   help="high: Algorithm 1 (fast cross-node links), low: Algorithm 2, colocated: the baseline")
    p.add_argument("--rate", type=float, default=4.0, help="target request rate (req/s)")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs in each node")
    p.add_argument("--cross-node-gbps", type=float, default=3.125, help="KV bandwidth between nodes (GB/s)")
    p.add_argument("--intra-node-gbps", type=float, default=300.0, help="KV bandwidth inside a node (GB/s)")
    p.add_argument("--out", default="plan.json", help="plan file to write (`distllm serve --plan` reads it)")
    p.set_defaults(fn=cmd_place)

    f = sub.add_parser("profile", help="time the engine's programs and fit the latency model")
    f.add_argument("--checkpoint", help="a converted checkpoint (default: --preset with random weights)")
    f.add_argument("--preset", default="tiny-opt", help="built-in config profiled with random weights")
    f.add_argument("--dtype", help="default: the checkpoint's; bfloat16 on GPU, float32 on CPU for presets")
    f.add_argument("--tp", default="1", help="tensor degrees to profile, comma list")
    f.add_argument("--prompt-lens", default="16,64,128,256", help="prompt lengths of the prefill grid, comma list")
    f.add_argument("--prompts-per-batch", default="1,2,4", help="prompts per prefill batch in the grid, comma list")
    f.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="skip prefill batches longer than this (the token budget you will serve with)")
    f.add_argument("--max-seq-len", type=int, default=None,
                   help="the max_seq_len you will serve with (decode programs are compiled for its page-table width)")
    f.add_argument("--batches", default="1,4,8,16", help="decode batch sizes of the grid, comma list")
    f.add_argument("--contexts", default="32,128,256", help="decode context lengths of the grid, comma list")
    f.add_argument("--repeats", type=int, default=3, help="timed runs of each point (the median is kept)")
    f.add_argument("--out", default="profile.json", help="profile JSON to write (--profile of simulate/place)")
    f.set_defaults(fn=cmd_profile)
