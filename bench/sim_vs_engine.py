"""Does the simulator predict the engine? On the present devices: profile the engine, then serve the
same workload at several rates both for real (in-process engine, Poisson arrivals) and in the simulator
fed with that profile, in colocated and disaggregated modes; compare median TTFT/TPOT and attainment.

Two profiles feed the simulator side by side: ``programs`` (``distllm profile``: each program timed
alone on an idle engine) and ``serving`` (the same latency model fitted to the steps the engine logged
while serving a calibration workload, another draw, first: on a shared host this holds what serving
adds to a step, the host's own work and, disaggregated, the other instance's). Every run also reports
how the steps it logged compare with each profile's prediction of them.

    python -m bench.sim_vs_engine --checkpoint ckpt/tiny --out bench/results/sim-vs-engine-cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np


def run_engine(engine, items, arrivals):
    from distllm_jax.engine import SamplingParams

    streams = [None] * len(items)

    def feed():
        t0 = time.perf_counter()
        for i, ((prompt, out), a) in enumerate(zip(items, arrivals)):
            d = t0 + a - time.perf_counter()
            if d > 0:
                time.sleep(d)
            streams[i] = engine.submit(prompt, SamplingParams(max_tokens=out, ignore_eos=True))

    t = threading.Thread(target=feed)
    t.start()
    t.join()
    res = [s.result() for s in streams]
    return [(r.timings.ttft, r.timings.tpot or 0.0) for r in res]


def calibrate_host(engine, scfg, prompt: list[int], probes: int = 20):
    """What the engine's host adds to its programs, measured on the idle engine against the same
    programs run directly (so the profile's fit error stays out of it):

    * per-step bookkeeping (scheduling, streaming): one request decoding alone, its TPOT minus a
      batch-1 decode step at that context;
    * admission: an idle request's TTFT minus its prefill step and that bookkeeping;
    * host contention (disaggregated, instances on one host's cores): a prefill and a decode
      instance stepping at the same time, against each alone.
    """
    from distllm_jax.engine import SamplingParams
    from distllm_jax.engine.programs import Segment
    from distllm_jax.placement.profiler import _median_ms, host_contention

    n_out = 33
    tpots, ttfts = [], []
    for _ in range(probes):
        o = engine.submit(prompt, SamplingParams(max_tokens=n_out, ignore_eos=True)).result()
        tpots.append(o.timings.tpot)
        ttfts.append(o.timings.ttft)
    p, d = engine.instances[0], engine.instances[-1]
    pkind = "prefill" if p.role in ("prefill", "colocated") else "mixed"
    dkind = "decode" if d.role in ("decode", "colocated") else "mixed"
    sp = SamplingParams(max_tokens=1)
    p.alloc.ensure("probe-p", len(prompt) + n_out)
    rows = [f"probe-d{i}" for i in range(8)]
    for rid in rows:
        d.alloc.ensure(rid, len(prompt) + n_out)
    ptable = list(p.alloc.table("probe-p"))
    pseg = [Segment(prompt, 0, ptable, sp, 0)]
    dseg = [Segment([5], len(prompt) + n_out // 2, list(d.alloc.table(rid)), sp, i) for i, rid in enumerate(rows)]
    try:
        prefill_s = _median_ms(lambda: p.run(pkind, [pseg]), probes) / 1e3
        decode_s = _median_ms(lambda: d.run(dkind, [dseg[:1]]), probes) / 1e3
        contention = 1.0
        if engine.config.mode == "disaggregated":
            contention = host_contention(lambda: p.run("prefill", [pseg]), lambda: d.run("decode", [dseg]))
    finally:
        p.alloc.free("probe-p")
        for rid in rows:
            d.alloc.free(rid)
    step = max(0.0, statistics.median(tpots) - decode_s)
    admission = max(0.0, statistics.median(ttfts) - prefill_s - step)
    return dataclasses.replace(scfg, admission_s=admission, step_overhead_s=step, host_contention=contention)


def _padded(buckets, n: int) -> int:
    from distllm_jax.placement.simulator import _bucket

    return _bucket(buckets, n) if buckets else n


def served_fit(steps, token_buckets, batch_buckets):
    """The latency model fitted to logged serving steps, on the padded shapes the engine ran (the
    simulator pads the same way): prefill ms = a + b·padded ΣL + c·ΣL², decode ms = a' + b'·Σ(ctx+1)
    + c'·padded batch. Returns the Fit and the fits' mean relative errors."""
    from distllm_jax.placement.latency import Fit, _lstsq

    pre = [r for r in steps if r.kind == "prefill"]
    dec = [r for r in steps if r.kind == "decode"]
    if len(pre) < 3 or len(dec) < 3:
        raise ValueError(f"too few logged steps to fit ({len(pre)} prefill, {len(dec)} decode)")
    p, perr = _lstsq(np.array([[1.0, _padded(token_buckets, sum(r.lengths)), sum(n * n for n in r.lengths)]
                               for r in pre]), np.array([1e3 * r.seconds for r in pre]))
    d, derr = _lstsq(np.array([[1.0, r.context, _padded(batch_buckets, len(r.lengths))] for r in dec]),
                     np.array([1e3 * r.seconds for r in dec]))
    return Fit(p, d, d, threshold=10**9), {"prefill_mean_rel_err": perr, "decode_mean_rel_err": derr,
                                           "prefill_steps": len(pre), "decode_steps": len(dec)}


def step_ratios(steps, fit, scfg) -> dict:
    """Median of logged / predicted step time, per kind (1.0: the profile predicts serving's steps)."""
    out = {}
    for kind in ("prefill", "decode"):
        rs = [r for r in steps if r.kind == kind]
        if not rs:
            continue
        if kind == "prefill":
            pred = [scfg.prefill_s(fit, list(r.lengths), 1) for r in rs]
        else:
            pred = [scfg.decode_s(fit, len(r.lengths), r.context, 1) for r in rs]
        out[kind] = statistics.median(r.seconds / max(p, 1e-9) for r, p in zip(rs, pred))
    return out


def _row(engine_v, sim_v, slo) -> dict:
    row = {}
    for tag, v in (("engine", engine_v), ("sim", sim_v)):
        row[f"{tag}_p50_ttft"] = statistics.median(x[0] for x in v)
        row[f"{tag}_p50_tpot"] = statistics.median(x[1] for x in v)
        row[f"{tag}_attainment"] = sum(1 for a, b in v if a <= slo[0] and b <= slo[1]) / len(v)
    row["ttft_rel_diff"] = row["sim_p50_ttft"] / row["engine_p50_ttft"] - 1
    row["tpot_rel_diff"] = row["sim_p50_tpot"] / row["engine_p50_tpot"] - 1
    row["attainment_diff_points"] = 100 * (row["sim_attainment"] - row["engine_attainment"])
    return row


def main(args) -> int:
    import jax

    from bench.arrivals import arrival_times
    from distllm_jax.engine import CheckpointSource, Engine, EngineConfig, InstanceSpec
    from distllm_jax.placement.profiler import profile
    from distllm_jax.placement.simulator import Par, SimConfig, SimRequest, Simulator

    source = CheckpointSource(args.checkpoint)
    ps, pages, budget, batch = 16, args.num_pages, args.budget, args.max_batch
    prof, errs = profile(source, [1], [16, 32, 64], [1, 2, 4], [1, 2, 4, 8, 16], [16, 48, 96],
                         page_size=ps, repeats=5, name=Path(args.checkpoint).name)
    vocab = source.cfg.vocab_size

    def draw(seed: int, n: int):
        rng = np.random.default_rng(seed)
        return [([int(t) for t in rng.integers(3, vocab, int(rng.integers(args.min_prompt, args.max_prompt)))],
                 int(rng.integers(args.min_output, args.max_output))) for _ in range(n)]

    items = draw(0, args.num_requests)
    calibration = draw(100, args.calibration_requests)
    lengths = [(len(p), o) for p, o in items]
    slo = (args.slo_ttft, args.slo_tpot)
    out = {"device": jax.devices()[0].device_kind, "args": vars(args),
           "profile_fit_errors": {k: {kk: vv for kk, vv in v.items() if "err" in kk} for k, v in errs.items()},
           "runs": []}
    layouts = {"colocated": dict(mode="colocated", colocated=(InstanceSpec(1),)),
               "disaggregated": dict(prefill=(InstanceSpec(1),), decode=(InstanceSpec(1),))}
    for name, lay in layouts.items():
        ecfg = EngineConfig(page_size=ps, num_pages=pages, max_seq_len=args.max_seq_len, prefill_token_budget=budget,
                            max_prefill_seqs=4, max_decode_batch=batch, progress=False, **lay)
        scfg = (SimConfig("colocated", colocated=(Par(),), prefill_token_budget=budget, max_prefill_seqs=4,
                          max_decode_batch=batch, kv_tokens=(pages - 1) * ps)
                if name == "colocated" else
                SimConfig("disaggregated", (Par(),), (Par(),), prefill_token_budget=budget, max_prefill_seqs=4,
                          max_decode_batch=batch, kv_tokens=(pages - 1) * ps, transfer_gbps=args.transfer_gbps))
        with Engine(source, ecfg) as engine:
            inst = engine.instances[-1]  # the engine pads steps to these compiled shapes; so does the model
            scfg = dataclasses.replace(scfg, batch_buckets=tuple(inst.batch_buckets),
                                       token_buckets=tuple(engine.instances[0].token_buckets),
                                       decode_lookahead=ecfg.async_decode)
            scfg = calibrate_host(engine, scfg, items[0][0])
            print(f"{name}: admission {1e3 * scfg.admission_s:.2f} ms, step overhead "
                  f"{1e3 * scfg.step_overhead_s:.2f} ms, host contention x{scfg.host_contention:.2f}")
            t0 = time.perf_counter()
            run_engine(engine, calibration, arrival_times(len(calibration), args.calibration_rate, seed=7))
            fit, ferr = served_fit(engine.step_log(t0), scfg.token_buckets, scfg.batch_buckets)
            served = dataclasses.replace(prof, fits={1: fit}, source="fitted to serving steps (calibration run)")
            # the served fit already holds the host's work and the other instance's share of the cores
            served_cfg = dataclasses.replace(scfg, step_overhead_s=0.0, host_contention=1.0)
            print(f"{name}: serving fit {fit.prefill} / {fit.decode_small}, mean |err| prefill "
                  f"{100 * ferr['prefill_mean_rel_err']:.1f}%, decode {100 * ferr['decode_mean_rel_err']:.1f}% "
                  f"over {ferr['prefill_steps']} + {ferr['decode_steps']} steps")
            for rate in args.rates:
                arr = arrival_times(len(items), rate, seed=1)
                t0 = time.perf_counter()
                real = run_engine(engine, items, arr)
                steps = engine.step_log(t0)
                for tag, pr, cfg in (("programs", prof, scfg), ("serving", served, served_cfg)):
                    sim = Simulator(pr, cfg).run([SimRequest(float(a), p, o) for (p, o), a in zip(lengths, arr)])
                    row = {"mode": name, "rate": rate, "profile": tag, "admission_s": cfg.admission_s,
                           "step_overhead_s": cfg.step_overhead_s, "host_contention": cfg.host_contention,
                           "steps_logged_over_predicted": step_ratios(steps, pr.fit(1), cfg),
                           **_row(real, [(r.ttft, r.tpot) for r in sim], slo)}
                    if tag == "serving":
                        row["serving_fit"] = {"prefill": fit.prefill, "decode": fit.decode_small, **ferr}
                    out["runs"].append(row)
                    ratio = " ".join(f"{k} x{v:.2f}" for k, v in row["steps_logged_over_predicted"].items())
                    print(f"{name:<14} rate {rate:>5g} [{tag:<8}]: TTFT p50 engine {1e3 * row['engine_p50_ttft']:7.1f} ms "
                          f"sim {1e3 * row['sim_p50_ttft']:7.1f} ({100 * row['ttft_rel_diff']:+.0f}%), TPOT p50 engine "
                          f"{1e3 * row['engine_p50_tpot']:6.2f} sim {1e3 * row['sim_p50_tpot']:6.2f} "
                          f"({100 * row['tpot_rel_diff']:+.0f}%), attainment {100 * row['engine_attainment']:.0f}% vs "
                          f"{100 * row['sim_attainment']:.0f}%; steps logged/predicted {ratio}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[5, 15, 30])
    p.add_argument("--num-requests", type=int, default=120)
    p.add_argument("--num-pages", type=int, default=200)
    p.add_argument("--budget", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--slo-ttft", type=float, default=0.1)
    p.add_argument("--slo-tpot", type=float, default=0.02)
    p.add_argument("--transfer-gbps", type=float, default=5.0)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--min-prompt", type=int, default=8)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--min-output", type=int, default=4)
    p.add_argument("--max-output", type=int, default=48)
    p.add_argument("--calibration-requests", type=int, default=60)
    p.add_argument("--calibration-rate", type=float, default=4.0)
    p.add_argument("--out", default="bench/results/sim-vs-engine-cpu.json")
    raise SystemExit(main(p.parse_args()))
