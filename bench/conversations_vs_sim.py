"""Prefix caching on multi-turn chat, engine and simulator side by side: ShareGPT conversations
replayed turn by turn (``sharegpt-conversations``: each turn resends the whole conversation, and the
next one arrives a think time after the reply ends) against an in-process engine with its prefix cache
off and on, at several conversation start rates; each run is also simulated, closed-loop the same way,
from a profile of the engine's programs (timed again just before and after each run, as
``bench/sim_vs_engine.py`` does). Per run: the prefix hit rate (prompt tokens served from cached pages
over all prompt tokens), median TTFT and TPOT, SLO attainment, and per cache setting the goodput (the
highest start rate run at >= 90 % attainment), for the engine and the simulator.

    python -m bench.conversations_vs_sim --checkpoint ckpt/tiny --max-seq-len 256 --out /tmp/conv.json
    python -m bench.conversations_vs_sim --preset opt-13b --prefix-cache off,on --rates 1,2,4 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time

from bench.sim_vs_engine import calibrate_host, compare_runs, int_list, speed_ratio, step_ratios, step_stats, weights, write_json


def hit_rate(pairs) -> float:
    """Prompt tokens served from cached pages over all prompt tokens ((cached, prompt) per request)."""
    total = sum(p for _, p in pairs)
    return sum(c for c, _ in pairs) / total if total else 0.0


def goodput(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per cache setting, the highest start rate at which the engine and the simulator each reach
    90 % attainment (0 when none does)."""
    out: dict[str, dict[str, float]] = {}
    for r in runs:
        g = out.setdefault(r["prefix_cache"], {"engine": 0.0, "sim": 0.0})
        for k in ("engine", "sim"):
            if r[f"{k}_attainment"] >= 0.9:
                g[k] = max(g[k], r["rate"])
    return out


def table(runs: list[dict]) -> str:
    lines = [f"{'cache':<6}{'rate':>6}{'hit eng':>9}{'sim':>6}{'TTFT eng':>10}{'sim':>8}{'TPOT eng':>10}{'sim':>8}"
             f"{'att eng':>9}{'sim':>6}{'pts':>6}"]
    for r in runs:
        lines.append(f"{r['prefix_cache']:<6}{r['rate']:>6g}{100 * r['engine_hit_rate']:>8.0f}%{100 * r['sim_hit_rate']:>5.0f}%"
                     f"{1e3 * r['engine_p50_ttft']:>10.1f}{1e3 * r['sim_p50_ttft']:>8.1f}"
                     f"{1e3 * r['engine_p50_tpot']:>10.2f}{1e3 * r['sim_p50_tpot']:>8.2f}"
                     f"{100 * r['engine_attainment']:>8.0f}%{100 * r['sim_attainment']:>5.0f}%"
                     f"{r['attainment_diff_points']:>+6.0f}")
    return "\n".join(lines)


def add_conversation_args(p: argparse.ArgumentParser, conversations: int, think_time: float) -> None:
    """The weights and the conversations, for the benches that replay chats against an engine."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a converted checkpoint directory (an OPT-sized vocabulary)")
    which.add_argument("--preset", help="a preset's real shapes with random weights (e.g. tiny-opt, opt-13b)")
    p.add_argument("--dtype", default=None, help="weights' dtype (default: the checkpoint's; bfloat16 on a GPU)")
    p.add_argument("--dataset", default="sharegpt-conversations", help="sharegpt-conversations[:PATH]")
    p.add_argument("--num-conversations", type=int, default=conversations)
    p.add_argument("--think-time", type=float, default=think_time,
                   help="mean seconds between a reply and the next turn")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    import jax

    from bench.conversations import run_conversations_engine, simulate_conversations
    from distllm_jax import compile_cache
    from distllm_jax.engine import Engine, EngineConfig, InstanceSpec
    from distllm_jax.placement.profiler import Profiler, make_profile
    from distllm_jax.placement.simulator import SimConfig, Simulator
    from distllm_jax.tokenizer import bundled_gpt2
    from distllm_jax.workload.conversations import ConversationReplay, load_conversations

    compile_cache.enable(None if args.compile_cache == "off" else args.compile_cache)
    source, model_name = weights(args)
    tok = bundled_gpt2()
    convs = load_conversations(args.dataset, lambda s: tok.encode(s).ids, args.num_conversations, args.max_seq_len,
                               seed=args.seed, tokenizer_id="gpt2-bpe").conversations
    vocab = source.cfg.vocab_size
    if any(t >= vocab for c in convs for u in c.turns for t in u.ids):
        raise SystemExit(f"the model's vocabulary ({vocab}) is smaller than GPT-2's: use an OPT-sized one")
    ps, pages, budget, batch = 16, args.num_pages, args.budget, args.max_batch
    profiler = Profiler(source, 1, args.prompt_lens, args.prompts_per_batch, args.batches, args.contexts, page_size=ps,
                        max_prefill_tokens=budget, max_seq_len=args.max_seq_len, max_decode_pages=pages)
    first = profiler.measure(5)
    fit0, errs = profiler.fit(first, print)
    slo = (args.slo_ttft, args.slo_tpot)
    turns = sum(len(c.turns) for c in convs)
    out = {"device": jax.devices()[0].device_kind, "args": vars(args), "conversations": len(convs), "turns": turns,
           "profile_fit_errors": {k: v for k, v in errs.items() if "err" in k}, "runs": []}
    print(f"{len(convs)} conversations, {turns} turns, think time {args.think_time:g} s")
    for cache in args.prefix_cache:
        on = cache == "on"
        ecfg = EngineConfig(mode="colocated", colocated=(InstanceSpec(1),), page_size=ps, num_pages=pages,
                            max_seq_len=args.max_seq_len, prefill_token_budget=budget, max_prefill_seqs=4,
                            max_decode_batch=batch, progress=False, prefix_cache=on)
        scfg = SimConfig("colocated", colocated=(InstanceSpec(),), prefill_token_budget=budget, max_prefill_seqs=4,
                         max_decode_batch=batch, kv_tokens=(pages - 1) * ps, prefix_cache=on)
        with Engine(source, ecfg) as engine:
            scfg = dataclasses.replace(scfg, **engine.instances[0].compiled.sim_fields(),
                                       decode_lookahead=ecfg.async_decode)
            scfg = calibrate_host(engine, scfg, convs[0].appended(0)[: args.max_seq_len // 2])
            engine.reset_prefix_cache()  # the probes' pages are no conversation's
            for rate in args.rates:
                replay = ConversationReplay(convs, rate, args.think_time, seed=args.seed)
                before = profiler.measure(args.bracket) if args.bracket else None
                t0 = time.perf_counter()
                records = run_conversations_engine(engine, replay)
                steps = engine.step_log(t0)
                engine.reset_prefix_cache()  # the next rate starts cold, as the simulator does
                fit = fit0
                drift = None
                if before is not None:
                    after = profiler.measure(args.bracket)
                    fit, _ = profiler.fit({pt: before[pt] + after[pt] for pt in before})
                    drift = speed_ratio(after, before)
                sim = Simulator(make_profile(source, {1: fit}, model_name), scfg, record=True)
                done = simulate_conversations(sim, replay, ps, seed=args.seed)
                failed = [r for r in records if r.error is not None]
                if failed:
                    raise SystemExit(f"{len(failed)} turns failed, the first: {failed[0].error}")
                real = [(r.server["ttft"], r.server["tpot"] or 0.0) for r in records]
                row = {"prefix_cache": cache, "rate": rate, "turns": {"engine": len(records), "sim": len(done)},
                       "engine_hit_rate": hit_rate([(r.server["cached_prompt_tokens"], r.prompt_len) for r in records]),
                       "sim_hit_rate": hit_rate([(s.cached_prompt_tokens, s.prompt_len) for _, s in done]),
                       "admission_s": scfg.admission_s, "step_overhead_s": scfg.step_overhead_s,
                       "decode_restart_s": scfg.decode_restart_s, "host_speed_after_over_before": drift,
                       "steps_logged_over_predicted": step_ratios([(steps, fit)], scfg),
                       "steps": {"engine": step_stats(steps), "sim": step_stats(sim.steps)},
                       "served_s": {"engine": max(r.finish for r in records),
                                    "sim": max(s.finish for _, s in done)},
                       "fit": {"prefill": list(fit.prefill), "decode_small": list(fit.decode_small),
                               "decode_large": list(fit.decode_large), "threshold": fit.threshold},
                       **compare_runs(real, [(s.ttft, s.tpot) for _, s in done], slo)}
                out["runs"].append(row)
                write_json(args.out, out)
                ratio = " ".join(f"{k} x{v:.2f}" for k, v in row["steps_logged_over_predicted"].items())
                print(f"cache {cache:<3} rate {rate:>5g}: hit {100 * row['engine_hit_rate']:.0f}% sim "
                      f"{100 * row['sim_hit_rate']:.0f}%, TTFT p50 {1e3 * row['engine_p50_ttft']:.1f} ms sim "
                      f"{1e3 * row['sim_p50_ttft']:.1f}, TPOT p50 {1e3 * row['engine_p50_tpot']:.2f} sim "
                      f"{1e3 * row['sim_p50_tpot']:.2f}, attainment {100 * row['engine_attainment']:.0f}% sim "
                      f"{100 * row['sim_attainment']:.0f}%; steps logged/predicted {ratio}", flush=True)
        del engine  # the next setting's engine allocates its pool only after this one's is gone
        gc.collect()
    out["goodput"] = goodput(out["runs"])
    print(table(out["runs"]))
    print("goodput (the highest start rate at >= 90 % attainment), engine / sim: " + ", ".join(
        f"cache {k} {v['engine']:g} / {v['sim']:g}" for k, v in out["goodput"].items()))
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from distllm_jax.compile_cache import default_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_conversation_args(p, conversations=40, think_time=2.0)
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1, 2, 4],
                   help="conversation start rates (conversations per second)")
    p.add_argument("--prefix-cache", type=lambda s: s.split(","), default=["off", "on"],
                   help="cache settings to run, in order (off, on)")
    p.add_argument("--prompt-lens", type=int_list, default=[16, 32, 64], help="profile grid: prompt lengths")
    p.add_argument("--prompts-per-batch", type=int_list, default=[1, 2, 4], help="profile grid: prompts per prefill")
    p.add_argument("--batches", type=int_list, default=[1, 2, 4, 8, 16], help="profile grid: decode batch sizes")
    p.add_argument("--contexts", type=int_list, default=[16, 48, 96], help="profile grid: decode contexts")
    p.add_argument("--bracket", type=int, default=2, help="rounds of the grid timed just before and after each run")
    p.add_argument("--num-pages", type=int, default=400)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--slo-ttft", type=float, default=0.25)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--out", default="bench/results/conversations-vs-sim.json")
    p.add_argument("--compile-cache", default=str(default_dir()),
                   help="jax's persistent compilation cache directory, or 'off' (default: %(default)s)")
    raise SystemExit(main(p.parse_args()))
