"""``distllm bench …``: run, goodput, plot, kick-the-tires, engine (the engine micro-benchmark),
multi-gpu, sim-vs-real (the simulator against DistServe's published A100 runs)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="distllm-grpc", choices=["distllm-grpc", "openai"],
                   help="distllm's gRPC API, or any OpenAI-compatible HTTP server")
    p.add_argument("--address", default="127.0.0.1:50051", help="gRPC address (distllm-grpc backend)")
    p.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (openai backend)")
    p.add_argument("--model", help="model name at --base-url (default: the first it serves)")
    p.add_argument("--devices", type=int, default=1, help="GPUs behind an openai-backend server (per-GPU rates)")
    p.add_argument("--token", default=os.environ.get("DISTLLM_AUTH_TOKEN"),
                   help="bearer token (default: env DISTLLM_AUTH_TOKEN, which keeps it out of `ps`)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS server with")
    p.add_argument("--tokenizer", help="tokenizer (checkpoint dir or tokenizer.json); default: the server's Tokenize")
    p.add_argument("--dataset", default="sharegpt",
                   help="sharegpt | sharegpt-artifact | humaneval | longbench | file:PATH; `bench run` also takes "
                        "sharegpt-conversations[:PATH] (multi-turn chats replayed turn by turn, closed loop)")
    p.add_argument("--slo", default="opt-13b-sharegpt", help="preset or 'TTFT,TPOT' seconds")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    p.add_argument("--seed", type=int, default=0, help="seed for the workload sample and the arrivals")
    p.add_argument("--results", default="bench/results", help="folder for run files ('' to skip)")
    p.add_argument("--cache-dir", help="prepared-workload cache (default ~/.cache/distllm)")


def _target(args: argparse.Namespace):
    from bench.runs import Target

    return Target(args.address, args.token, args.tls_ca, args.tokenizer, backend=args.backend,
                  base_url=args.base_url, model=args.model, devices=args.devices)


def _run(args: argparse.Namespace) -> int:
    from bench.runs import parse_pairs, print_table, run_conversations_once, run_once
    from distllm_jax.workload.conversations import is_conversations
    from distllm_jax.workload.slo import resolve

    if args.think_time < 0:
        raise ValueError(f"--think-time must be >= 0 seconds, got {args.think_time}")
    target = _target(args)
    slo = resolve(args.slo)
    if args.trace:
        return _run_trace(args, target, slo)
    runs = []
    for n, rate in parse_pairs(args.num_prompts_req_rates):
        common = dict(burstiness=args.burstiness, seed=args.seed, verbose=args.verbose,
                      results=args.results or None, cache_dir=args.cache_dir)
        if is_conversations(args.dataset):
            run = run_conversations_once(target, args.dataset, n, rate, slo, think_time=args.think_time, **common)
        else:
            run = run_once(target, args.dataset, n, rate, slo, **common)
        runs.append(run)
        if "path" in run:
            print(f"wrote {run['path']}")
    print_table(runs)
    return 0


def _run_trace(args: argparse.Namespace, target, slo) -> int:
    """``bench run --trace``: the trace's arrivals and lengths against the server, its strict
    attainment and p50/p90 beside the trace's own measurements."""
    from bench.runs import print_table, run_trace

    run = run_trace(target, args.trace, slo, verbose=args.verbose, results=args.results or None)
    if "path" in run:
        print(f"wrote {run['path']}")
    print_table([run])
    for k, s in run["trace_compare"].items():
        if s is not None:
            print(f"{k:<6} attainment {s['attainment_pct']:.1f}% (strict)  TTFT p50/p90 {1e3 * s['ttft_p50_s']:.1f}/"
                  f"{1e3 * s['ttft_p90_s']:.1f} ms  TPOT p50/p90 {1e3 * s['tpot_p50_s']:.1f}/{1e3 * s['tpot_p90_s']:.1f} ms")
    return 0


def _goodput(args: argparse.Namespace) -> int:
    from distllm_jax.workload.goodput import goodput
    from bench.runs import print_table, run_once
    from distllm_jax.workload.slo import resolve

    target = _target(args)
    slo = resolve(args.slo)
    runs = []

    def attain(rate: float) -> float:
        run = run_once(target, args.dataset, args.num_prompts, rate, slo, burstiness=args.burstiness,
                       seed=args.seed, results=args.results or None, cache_dir=args.cache_dir)
        runs.append(run)
        print(f"rate {rate:g} req/s: attainment {100 * run['summary']['attainment']:.1f}%")
        return run["summary"]["attainment"]

    best, tried = goodput(attain, args.min_rate, args.max_rate, args.target, args.tolerance)
    print_table(sorted(runs, key=lambda r: r["config"]["rate"]))
    scale_run = min(runs, key=lambda r: abs(r["config"]["rate"] - (args.scale_rate or best or args.min_rate)))
    res = {"model": target.model, "mode": target.mode, "dataset": args.dataset, "slo": [slo.ttft, slo.tpot],
           "goodput": best, "per_gpu_goodput": best / max(1, target.devices), "devices": target.devices,
           "tried": tried, "tightest_slo_scale": scale_run["summary"]["tightest_slo_scale"],
           "scale_at_rate": scale_run["config"]["rate"]}
    print(f"goodput {best:g} req/s ({res['per_gpu_goodput']:g} per GPU) at >= {100 * args.target:.0f}% "
          f"attainment; tightest SLO scale at {res['scale_at_rate']:g} req/s: {res['tightest_slo_scale']:.3g}")
    if args.results:
        path = Path(args.results) / f"{target.model}-{args.dataset}" / f"goodput-{target.mode}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))
        print(f"wrote {path}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from bench.plot import plot
    from distllm_jax.workload.slo import resolve

    table = plot([Path(p) for p in args.runs], resolve(args.slo), Path(args.out), args.scale_rate)
    for mode, t in table.items():
        pts = ", ".join(f"{x:g}:{y:.0f}%" for x, y in zip(t["per_gpu_rate"], t["attainment"]))
        print(f"{mode:<14} attainment by per-GPU rate  {pts}")
    print(f"wrote {args.out}")
    return 0


def add_command(sub) -> None:
    """Mount ``distllm bench`` on the ``distllm`` command's subparsers ``sub`` (the entry point ``bench``
    of group ``distllm.commands``, pyproject.toml)."""
    b = sub.add_parser("bench", help="benchmarks")
    add_bench_commands(b.add_subparsers(dest="bench_command", required=True))


def add_bench_commands(bsub) -> None:
    from bench import engine_micro, kick_the_tires, multi_gpu, sim_vs_real

    r = bsub.add_parser("run", help="replay a workload against a running server at the given rates")
    _target_args(r)
    r.add_argument("--num-prompts-req-rates", default="[(50, 2)]",
                   help='e.g. "[(50, 2), (100, 4)]": (requests, req/s); with sharegpt-conversations, '
                        '(conversations, conversations started per second)')
    r.add_argument("--think-time", type=float, default=2.0,
                   help="sharegpt-conversations: mean seconds (exponential) between a reply and the user's next "
                        "turn. 2 s keeps a few dozen conversations to minutes and overlaps turns of several "
                        "conversations, yet leaves a gap a prefix cache must hold a conversation across; real "
                        "users read and type for longer, which only lightens the load (0: no pause)")
    r.add_argument("--verbose", action="store_true", help="print every prompt and response")
    r.add_argument("--trace", help="replay a recorded run's arrivals and lengths (JSON Lines or DistServe .exp) "
                                   "instead of --dataset/--num-prompts-req-rates")
    r.set_defaults(fn=_run)

    g = bsub.add_parser("goodput", help="bisect the highest rate with >= 90%% SLO attainment")
    _target_args(g)
    g.add_argument("--num-prompts", type=int, default=200, help="requests per rate tried")
    g.add_argument("--min-rate", type=float, default=0.5, help="lowest rate tried (req/s)")
    g.add_argument("--max-rate", type=float, default=16.0, help="highest rate tried (req/s)")
    g.add_argument("--target", type=float, default=0.9, help="SLO attainment the goodput must reach (0-1)")
    g.add_argument("--tolerance", type=float, default=0.05, help="relative width at which bisection stops")
    g.add_argument("--scale-rate", type=float, help="rate for the tightest-SLO-scale report (default: the goodput)")
    g.set_defaults(fn=_goodput)

    pl = bsub.add_parser("plot", help="attainment vs rate / SLO scale and the latency breakdown (PNG)")
    pl.add_argument("runs", nargs="+", help="run files or folders of them")
    pl.add_argument("--slo", default="opt-13b-sharegpt", help="preset or 'TTFT,TPOT' seconds")
    pl.add_argument("--out", default="bench/results/attainment.png", help="PNG to write")
    pl.add_argument("--scale-rate", type=float, help="per-GPU rate for the SLO-scale panel")
    pl.set_defaults(fn=_plot)

    k = bsub.add_parser("kick-the-tires", help="all three modes, (50 prompts, 2 req/s) each, with a plot",
                        description=kick_the_tires.__doc__)
    kick_the_tires.add_arguments(k)
    k.set_defaults(fn=kick_the_tires.main)

    e = bsub.add_parser("engine", help="engine micro-benchmark: prefill, decode steps, KV migration, e2e",
                        description=engine_micro.__doc__)
    engine_micro.add_arguments(e)
    e.set_defaults(fn=engine_micro.main)

    # the module's notes on running it on lent machines are for the project, not for --help
    mg = bsub.add_parser("multi-gpu", help="disaggregated vs colocated on one node: plan, sweep, breakdown, simcheck",
                         description=multi_gpu.__doc__.split("\nOn a lent ", 1)[0])
    multi_gpu.add_arguments(mg)
    mg.set_defaults(fn=multi_gpu.main)

    sv = bsub.add_parser("sim-vs-real", help="replay real A100 runs (DistServe's traces) through the simulator",
                         description=sim_vs_real.__doc__)
    sim_vs_real.add_arguments(sv)
    sv.set_defaults(fn=sim_vs_real.main)
