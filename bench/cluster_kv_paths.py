"""Per-request KV migration time between two Ray actors, for each KV path (transfer server, staged).

    python -m bench.cluster_kv_paths --out bench/results/cluster-kv-paths-cpu.json

Starts a local Ray cluster, a prefill actor and a decode actor (tp each, virtual CPU devices on a CPU
host), prefills one prompt per length, then times ``RemoteKVPuller.pull`` of its pages (what the
decode worker waits for: the serving process issues both actor calls and waits until the pages are
in the decode pool) on each path, and checks every pull bit for bit. The in-process ``local`` path
(both instances in one process) is timed on the same layout for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="opt-125m")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--lengths", default="16,128,512", help="prompt lengths (tokens)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", help="write the results here (JSON)")
    args = p.parse_args()

    import jax
    import ray

    from distllm_jax.cluster import ClusterConfig, ClusterEngine
    from distllm_jax.cluster.kv_paths import RemoteKVPuller
    from distllm_jax.engine import Engine, EngineConfig, InstanceSpec, RandomSource, SamplingParams
    from distllm_jax.engine.programs import Segment
    from distllm_jax.engine.transfer import LocalKVPuller, pages_equal
    from distllm_jax.kv_cache import pages_for
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset

    lengths = [int(x) for x in args.lengths.split(",")]
    src_cfg = RandomSource(ModelConfig.from_hf_dict(preset(args.preset)), "float32", 0)
    cfg = EngineConfig(prefill=(InstanceSpec(args.tp),), decode=(InstanceSpec(args.tp),), page_size=16,
                       num_pages=4 * pages_for(max(lengths), 16) + 8, max_seq_len=max(lengths) + 16,
                       prefill_token_budget=max(lengths), max_decode_batch=4, progress=False)
    max_pages = pages_for(cfg.seq_len(src_cfg.cfg), cfg.page_size)
    m = src_cfg.cfg
    per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4

    def measure(src, dst, puller, guard) -> dict[int, list[float]]:
        out = {}
        for n in lengths:
            rid = f"m{n}-{puller.kind}"
            with guard:
                sp, dp = src.alloc.ensure(rid, n), dst.alloc.ensure(rid, n)
            src.run("prefill", [[Segment(list(range(3, 3 + n)), 0, sp, SamplingParams(), 0)]])
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                assert puller.pull(src, sp, dst, dp) in (None, puller.kind)  # no fallback taken
                times.append(time.perf_counter() - t0)
            assert pages_equal(src, sp, dst, dp), f"{puller.kind}: KV changed in transit"
            with guard:
                src.alloc.free(rid)
                dst.alloc.free(rid)
            out[n] = times[1:]  # the first pull of a size compiles nothing, but warms caches
            print(f"{puller.kind:>16} {n:>5} tokens ({n * per_token / 1e6:6.2f} MB): "
                  f"median {1e3 * statistics.median(out[n]):7.2f} ms", flush=True)
        return out

    results: dict = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        eng = ClusterEngine(src_cfg, cfg, ClusterConfig(kv_path="auto"), start=False)
        src, dst = eng.instances
        for kind in ("transfer-server", "staged"):
            puller = RemoteKVPuller(kind, max_pages)
            puller.warmup(src, dst)
            results[kind] = measure(src, dst, puller, eng.ctrl.lock)
        eng.shutdown(drain=False)
    finally:
        ray.shutdown()
    local = Engine(src_cfg, cfg, start=False)
    puller = LocalKVPuller(max_pages)
    results["local (one process)"] = measure(*local.instances, puller, local.ctrl.lock)
    local.shutdown(drain=False)

    report = {
        "what": "per-request KV migration time between a prefill and a decode instance, by path",
        "model": args.preset, "dtype": "float32", "layout": f"prefill tp{args.tp} -> decode tp{args.tp}",
        "page_size": 16, "bytes_per_token": per_token, "repeats": args.repeats,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__,
                 "ray": ray.__version__, "backend": "cpu (virtual devices, one process per actor)"},
        "paths": {k: {str(n): {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
                               "mb": n * per_token / 1e6} for n, t in v.items()} for k, v in results.items()},
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
