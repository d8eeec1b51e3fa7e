"""Engine micro-benchmark: prefill tokens/s, decode step times, KV migration time, and an offline
end-to-end run, on a model config with random weights (or a converted checkpoint).

    distllm bench engine --preset tiny-opt --out bench/results/engine-micro-cpu.json
    python -m bench.engine_micro --preset opt-1.3b --dtype bfloat16 ...

Components are timed on instances built exactly as the engine builds them (same programs, same
bucketed shapes); each number is the median of ``--repeats`` runs after one warm-up run. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up run, each waited for
    with ``jax.block_until_ready`` on what it returns."""
    jax.block_until_ready(fn())  # warm-up (and compilation, if any)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def back_to_back_ms(fn: Callable[[int], Any], passes: int, repeats: int) -> float:
    """One pass of ``fn(i)``, timed as ``passes`` dispatched back to back and waited for once: a
    pass of a millisecond or less is shorter than a dispatch plus a host sync, and timing each alone
    (as the GPU suite and the kernel benchmark first did) put that overhead into the rate (1.9 TB/s
    and 660 TFLOP/s on an H200 that copies at about 3.3 TB/s and multiplies at about 690)."""
    return median_ms(lambda: [fn(i) for i in range(passes)][-1], repeats) / passes


def _source(args: argparse.Namespace):
    from distllm_jax.engine import CheckpointSource, RandomSource
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset

    if args.checkpoint:
        return CheckpointSource(args.checkpoint, args.dtype)
    return RandomSource(ModelConfig.from_hf_dict(preset(args.preset)), args.dtype or _default_dtype(), args.seed)


def _default_dtype() -> str:
    return "bfloat16" if jax.default_backend() == "gpu" else "float32"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from distllm_jax.engine import EngineConfig, InstanceSpec, SamplingParams
    from distllm_jax.engine.instance import Instance
    from distllm_jax.engine.programs import Segment
    from distllm_jax.engine.transfer import LocalKVPuller
    from distllm_jax.kv_cache import pages_for
    from distllm_jax.engine.engine import attention_impl
    from distllm_jax.models.params import param_count

    source = _source(args)
    cfg = source.cfg
    max_len = min(cfg.max_position_embeddings, max(max(args.contexts) + 1, args.prompt_len + args.output_len, 64))
    args.contexts = sorted({min(c, max_len - 1) for c in args.contexts})  # the model's positions bound them
    args.migrate_lens = sorted({min(c, max_len - 1) for c in args.migrate_lens})
    migrate_pages = max(pages_for(L, args.page_size) for L in args.migrate_lens)
    decode_pages = max(b * pages_for(c + 1, args.page_size) for b in args.batches for c in args.contexts)
    decode_pages = max(decode_pages, args.e2e * pages_for(args.prompt_len + args.output_len, args.page_size)) + migrate_pages + 1
    prefill_pages = max(pages_for(max(args.prefill_tokens), args.page_size) + args.e2e, migrate_pages) + 1
    ecfg = EngineConfig(
        page_size=args.page_size, num_pages=decode_pages, max_seq_len=max_len,
        prefill_token_budget=max(args.prefill_tokens), max_prefill_seqs=max(1, max(args.prefill_tokens) // args.prompt_len),
        max_decode_batch=max(args.batches), progress=False, dtype=source.dtype,
    )
    devs = jax.devices()
    p_spec = InstanceSpec(args.prefill_tp, args.prefill_pp, num_pages=prefill_pages)
    d_spec = InstanceSpec(args.decode_tp, num_pages=decode_pages)
    need = p_spec.num_devices + d_spec.num_devices
    shared = need > len(devs)  # one GPU: both instances on the same device(s)
    p_devs = devs[: p_spec.num_devices]
    d_devs = devs[: d_spec.num_devices] if shared else devs[p_spec.num_devices : need]
    t0 = time.perf_counter()
    impl = attention_impl(args.attention)
    p = Instance("prefill0", "prefill", p_spec, p_devs, source, ecfg, impl)
    d = Instance("decode0", "decode", d_spec, d_devs, source, ecfg, impl)
    load_s = time.perf_counter() - t0
    sp = SamplingParams()
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {
        "device": str(devs[0].device_kind), "backend": jax.default_backend(), "jax": jax.__version__,
        "model": args.checkpoint or args.preset, "params": param_count(cfg), "dtype": source.dtype,
        "attention": impl.name, "prefill_instance": p_spec.label(), "decode_instance": d_spec.label(), "shared_devices": shared,
        "load_seconds": load_s, "pool_pages": {"prefill": prefill_pages, "decode": decode_pages}, "prefill": [], "decode": [], "migration": [],
    }

    for T in args.prefill_tokens:
        n = max(1, T // args.prompt_len)
        segs = []
        for i in range(n):
            L = min(args.prompt_len, T - i * args.prompt_len) if i < n - 1 else T - (n - 1) * args.prompt_len
            segs.append(Segment(list(rng.integers(3, cfg.vocab_size, L)), 0, p.alloc.ensure(("pf", i), L), sp, 0))
        ms = median_ms(lambda: [o.ids for o in p.dispatch("prefill", [segs])], args.repeats)
        out["prefill"].append({"tokens": T, "prompts": n, "ms": ms, "tokens_per_s": T / ms * 1e3})
        for i in range(n):
            p.alloc.free(("pf", i))

    for C in args.contexts:
        for B in args.batches:
            segs = [Segment([1], C, d.alloc.ensure(("dc", i), C + 1), sp, 0) for i in range(B)]
            ms = median_ms(lambda: [o.ids for o in d.dispatch("decode", [segs])], args.repeats)
            out["decode"].append({"batch": B, "context": C, "ms": ms, "tokens_per_s": B / ms * 1e3})
            for i in range(B):
                d.alloc.free(("dc", i))

    puller = LocalKVPuller(max_pages=pages_for(max_len, args.page_size))
    for L in args.migrate_lens:
        n = pages_for(L, args.page_size)
        src, dst = p.alloc.ensure("m", L), d.alloc.ensure("m", L)

        def pull():
            puller.pull(p, src, d, dst)
            return [st.pool for st in d.stages]

        ms = median_ms(pull, args.repeats)
        kv_bytes = 2 * cfg.num_layers * n * args.page_size * cfg.num_kv_heads * cfg.head_dim * p.dtype.itemsize
        out["migration"].append({"prompt_len": L, "pages": n, "ms": ms, "MB": kv_bytes / 1e6,
                                 "GB_per_s": kv_bytes / ms / 1e6})
        p.alloc.free("m")
        d.alloc.free("m")
    p.alloc.assert_no_leaks()
    d.alloc.assert_no_leaks()
    p = d = None  # free both instances before the end-to-end engine loads its own

    if args.e2e:
        from distllm_jax.engine import Engine

        # one device cannot hold disjoint prefill and decode meshes: run the colocated baseline there
        mode = args.e2e_mode if args.e2e_mode != "auto" else ("colocated" if shared else "disaggregated")
        ecfg_e2e = EngineConfig(
            mode=mode, prefill=(p_spec,), decode=(d_spec,), colocated=(d_spec,), page_size=args.page_size,
            num_pages=decode_pages, max_seq_len=max_len, prefill_token_budget=max(args.prefill_tokens),
            max_decode_batch=max(args.batches), progress=False, dtype=source.dtype, attention=args.attention,
        )
        with Engine(source, ecfg_e2e) as eng:
            prompts = [list(rng.integers(3, cfg.vocab_size, args.prompt_len)) for _ in range(args.e2e)]
            t0 = time.perf_counter()
            res = eng.generate_all(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True))
            wall = time.perf_counter() - t0
            toks = sum(len(r.token_ids) for r in res)
            out["e2e"] = {
                "mode": mode, "requests": args.e2e, "wall_s": wall, "output_tokens_per_s": toks / wall,
                "mean_ttft_ms": 1e3 * statistics.mean(r.timings.ttft for r in res),
                "mean_tpot_ms": 1e3 * statistics.mean(r.timings.tpot for r in res if r.timings.tpot),
                "mean_migration_ms": 1e3 * statistics.mean(
                    [r.timings.migration for r in res if r.timings.migration is not None] or [0.0]),
                "warmup_s": eng.warmup_seconds,
            }
    return out


def print_table(res: dict[str, Any]) -> None:
    print(f"{res['model']} ({res['params'] / 1e6:.1f}M params, {res['dtype']}) on {res['device']} "
          f"[{res['backend']}, jax {res['jax']}], attention {res['attention']}, prefill {res['prefill_instance']}, decode {res['decode_instance']}")
    print(f"\n{'prefill tokens':>15} {'prompts':>8} {'ms':>10} {'tokens/s':>12}")
    for r in res["prefill"]:
        print(f"{r['tokens']:>15} {r['prompts']:>8} {r['ms']:>10.2f} {r['tokens_per_s']:>12.0f}")
    print(f"\n{'decode batch':>15} {'context':>8} {'step ms':>10} {'tokens/s':>12}")
    for r in res["decode"]:
        print(f"{r['batch']:>15} {r['context']:>8} {r['ms']:>10.2f} {r['tokens_per_s']:>12.0f}")
    print(f"\n{'migrate tokens':>15} {'pages':>8} {'ms':>10} {'MB':>8} {'GB/s':>8}")
    for r in res["migration"]:
        print(f"{r['prompt_len']:>15} {r['pages']:>8} {r['ms']:>10.2f} {r['MB']:>8.2f} {r['GB_per_s']:>8.2f}")
    if "e2e" in res:
        e = res["e2e"]
        print(f"\nend to end ({e['mode']}): {e['requests']} requests in {e['wall_s']:.2f}s, {e['output_tokens_per_s']:.0f} output "
              f"tokens/s, mean TTFT {e['mean_ttft_ms']:.1f} ms, TPOT {e['mean_tpot_ms']:.2f} ms, "
              f"migration {e['mean_migration_ms']:.2f} ms")


def add_arguments(p: argparse.ArgumentParser) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--preset", default="tiny-opt", help="built-in model config (random weights)")
    p.add_argument("--checkpoint", help="a converted checkpoint instead of a preset")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed")
    p.add_argument("--prefill-tp", type=int, default=1, help="tensor degree of the prefill instance")
    p.add_argument("--prefill-pp", type=int, default=1, help="pipeline stages of the prefill instance")
    p.add_argument("--decode-tp", type=int, default=1, help="tensor degree of the decode instance")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--attention", default="auto", choices=["auto", "pallas", "reference"],
                   help="auto: the Pallas kernels on GPU, the XLA reference elsewhere")
    p.add_argument("--prefill-tokens", type=ints, default=[128, 512], help="packed tokens per prefill step")
    p.add_argument("--prompt-len", type=int, default=128,
                   help="prompt length (prefill steps pack prompts this long; end-to-end requests too)")
    p.add_argument("--output-len", type=int, default=32, help="output tokens of each end-to-end request")
    p.add_argument("--batches", type=ints, default=[1, 8, 32], help="decode batch sizes timed, comma list")
    p.add_argument("--contexts", type=ints, default=[128, 512], help="decode context lengths timed, comma list")
    p.add_argument("--migrate-lens", type=ints, default=[128, 512], help="prompt lengths whose KV migration is timed")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each point (the median is kept)")
    p.add_argument("--e2e", type=int, default=16, help="requests in the end-to-end run (0: skip)")
    p.add_argument("--e2e-mode", default="auto", choices=["auto", "disaggregated", "colocated", "chunked"],
                   help="auto: disaggregated when the devices allow disjoint meshes, else colocated")
    p.add_argument("--out", help="JSON output path (default: bench/results/engine-micro-<backend>-<model>.json)")


def main(args: argparse.Namespace) -> int:
    res = run(args)
    print_table(res)
    name = Path(args.checkpoint).name if args.checkpoint else args.preset
    path = Path(args.out or f"bench/results/engine-micro-{res['backend']}-{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.engine_micro", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
