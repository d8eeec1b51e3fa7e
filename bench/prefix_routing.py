"""KV-aware routing across prefill instances on multi-turn chat: ShareGPT conversations replayed turn by
turn (``sharegpt-conversations``: each turn resends the whole conversation, the next arrives a think
time after the reply ends) against an in-process disaggregated engine with several prefill instances
and the prefix cache on, once per routing policy (``prefix``: where the request costs the fewest tokens
to prefill, cached pages counted, plus the tokens queued there; ``round-robin``; ``shared``: one
queue, the first free instance), and once with the cache off as the baseline. Per policy: the prefix
hit rate (prompt tokens served from cached pages over all prompt tokens), the share of routing
decisions that followed a cached prefix, median and p90 TTFT, median TPOT and SLO attainment.

On a machine without a GPU the instances run on virtual CPU devices (one each).

    python -m bench.prefix_routing --preset tiny-opt --num-conversations 24 --out /tmp/routing.json
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench.conversations_vs_sim import add_conversation_args, hit_rate
from bench.sim_vs_engine import weights, write_json

POLICIES = ("prefix", "round-robin", "shared")


def summarize(records: list, slo: tuple[float, float]) -> dict:
    """The run's hit rate, TTFT and TPOT percentiles and attainment (one record per turn)."""
    ttft = sorted(r.server["ttft"] for r in records)
    tpot = [r.server["tpot"] or 0.0 for r in records]
    return {"turns": len(records),
            "hit_rate": hit_rate([(r.server["cached_prompt_tokens"], r.prompt_len) for r in records]),
            "p50_ttft": statistics.median(ttft), "p90_ttft": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
            "p50_tpot": statistics.median(tpot),
            "attainment": sum(1 for a, b in zip((r.server["ttft"] for r in records), tpot)
                              if a <= slo[0] and b <= slo[1]) / len(records)}


def table(rows: list[dict]) -> str:
    lines = [f"{'routing':<14}{'turns':>6}{'hit':>7}{'cache-routed':>14}{'TTFT p50':>10}{'p90':>8}{'TPOT p50':>10}"
             f"{'attain':>8}"]
    for r in rows:
        routed = "-" if r["cache_routed_share"] is None else f"{100 * r['cache_routed_share']:.0f}%"
        lines.append(f"{r['routing']:<14}{r['turns']:>6}{100 * r['hit_rate']:>6.0f}%{routed:>14}"
                     f"{1e3 * r['p50_ttft']:>10.1f}{1e3 * r['p90_ttft']:>8.1f}{1e3 * r['p50_tpot']:>10.2f}"
                     f"{100 * r['attainment']:>7.0f}%")
    return "\n".join(lines)


def main(args) -> int:
    import jax

    from bench.conversations import run_conversations_engine
    from distllm_jax import compile_cache
    from distllm_jax.engine import Engine, EngineConfig, InstanceSpec
    from distllm_jax.tokenizer import bundled_gpt2
    from distllm_jax.workload.conversations import ConversationReplay, load_conversations

    compile_cache.enable(None if args.compile_cache == "off" else args.compile_cache)
    need = args.prefill_instances + 1
    if len(jax.devices()) < need:
        raise SystemExit(f"{args.prefill_instances} prefill instances and a decode instance need {need} devices; "
                         f"this process sees {len(jax.devices())}")
    source, model_name = weights(args)
    tok = bundled_gpt2()
    convs = load_conversations(args.dataset, lambda s: tok.encode(s).ids, args.num_conversations, args.max_seq_len,
                               seed=args.seed, tokenizer_id="gpt2-bpe").conversations
    if any(t >= source.cfg.vocab_size for c in convs for u in c.turns for t in u.ids):
        raise SystemExit(f"the model's vocabulary ({source.cfg.vocab_size}) is smaller than GPT-2's: "
                         "use an OPT-sized one")
    slo = (args.slo_ttft, args.slo_tpot)
    out = {"device": jax.devices()[0].device_kind, "model": model_name, "args": vars(args),
           "conversations": len(convs), "turns": sum(len(c.turns) for c in convs), "runs": []}
    print(f"{len(convs)} conversations, {out['turns']} turns, {args.prefill_instances} prefill instances")
    for routing in args.routing:
        cache = routing != "off"
        cfg = EngineConfig(mode="disaggregated", prefill=(InstanceSpec(1),) * args.prefill_instances,
                           decode=(InstanceSpec(1),), page_size=args.page_size, num_pages=args.num_pages,
                           max_seq_len=args.max_seq_len, prefill_token_budget=args.budget,
                           max_decode_batch=args.max_batch, progress=False, prefix_cache=cache,
                           prefill_routing=routing if cache else "round-robin")
        with Engine(source, cfg) as engine:
            records = run_conversations_engine(engine, ConversationReplay(convs, args.rate, args.think_time,
                                                                          seed=args.seed))
            failed = [r for r in records if r.error is not None]
            if failed:
                raise SystemExit(f"{len(failed)} turns failed, the first: {failed[0].error}")
            stats = engine.stats()["routing"]  # None with one shared queue: nothing is routed
            decisions = sum(stats["decisions"].values()) if stats else 0
            row = {"routing": routing, **summarize(records, slo), "decisions": stats and stats["decisions"],
                   "cache_routed_share": stats["cache_routed"] / decisions if cache and decisions else None}
        del engine
        out["runs"].append(row)
        write_json(args.out, out)
        print(table([row]).splitlines()[1], flush=True)
    print(table(out["runs"]))
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    from distllm_jax.compile_cache import default_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_conversation_args(p, conversations=24, think_time=0.5)
    p.add_argument("--rate", type=float, default=4.0, help="conversation start rate (conversations per second)")
    p.add_argument("--routing", type=lambda s: s.split(","), default=["off", *POLICIES],
                   help="runs, in order: routing policies with the cache on, and 'off' (the cache off)")
    p.add_argument("--prefill-instances", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=400, help="pages per instance")
    p.add_argument("--budget", type=int, default=256, help="prefill token budget")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--slo-ttft", type=float, default=0.25)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--out", default="bench/results/prefix-routing.json")
    p.add_argument("--compile-cache", default=str(default_dir()),
                   help="jax's persistent compilation cache directory, or 'off' (default: %(default)s)")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # one virtual CPU device an instance where there is no GPU (jax reads the flag at its start)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                                   f"{args.prefill_instances + 1}").strip()
    raise SystemExit(main(args))
