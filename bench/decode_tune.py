"""Sweep the paged decode kernel's launch choices per shape and store the fastest of each, the table
the kernel reads its defaults from (:mod:`pallas_kernels.decode_tuning`).

Each shape (head layout x batch x context) is timed in three rounds: the block sizes, warp counts,
pipeline stages, prefetch and heads-a-program choices of :func:`first_round` with the splits that fill
the GPU; then the best of those with 1, 2, 4 and 8 splits; then with its neighbouring stage counts. Every config is checked against the XLA
reference before it is timed. The read-only streaming rate is measured in the same process, so each
entry carries its share of it, and the kernel's former default (:data:`DEFAULT`) is timed beside.

    python3 -m bench.decode_tune --layouts 40:40:128,32:8:128 --batches 8,32,128 --contexts 512,2048 \\
        --out pallas_kernels/decode_tuning.json
    python3 -m bench.decode_tune --layouts 4:2:64 --batches 2 --contexts 64 --out /tmp/t.json  # CPU, interpreted
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from bench.kernels import decode_inputs, read_bandwidth, rel_err, time_ms
from pallas_kernels.decode_tuning import DEFAULT, DecodeConfig, fill_splits
from pallas_kernels.paged_decode_attention import bytes_moved, paged_decode_attention

PAGE = 16


def first_round(q_heads: int, kv_heads: int) -> list[DecodeConfig]:
    """Block size x warps x how loads overlap the math (Triton's pipeliner, three stages; or one stage
    with the kernel's own register prefetch; or neither) with one KV head a program; with grouped
    queries also 2 and 4 heads a program at the smaller blocks (their tiles multiply the registers a
    program holds)."""
    overlap = ((3, False), (1, True), (1, False))
    out = [DecodeConfig(ppb, None, 1, w, st, pf) for ppb, w, (st, pf) in itertools.product((2, 4, 8), (4, 8), overlap)]
    if q_heads > kv_heads:
        out += [DecodeConfig(ppb, None, h, 4, st, pf)
                for h, ppb, (st, pf) in itertools.product((2, 4), (2, 4), overlap) if kv_heads % h == 0]
    return out


def _explicit(cfg: DecodeConfig, B: int, KVH: int) -> DecodeConfig:
    """The config with its splits spelled out, so the stored table never decides what is timed."""
    return cfg if cfg.splits is not None else dataclasses.replace(cfg, splits=fill_splits(B, KVH, cfg.heads_per_program))


def tune_shape(B: int, ctx: int, H: int, KVH: int, Dh: int, *, dtype=jnp.bfloat16, interpret: bool = False,
               reps: int = 20, key: jax.Array | None = None, first: list[DecodeConfig] | None = None,
               splits: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
    """The fastest config at one shape (``first``: the first round's configs, default :func:`first_round`)."""
    from distllm_jax.models.attention import paged_decode_attention as xla_ref

    q, kp, vp, tables, lengths = decode_inputs(B, ctx, H, KVH, Dh, PAGE, dtype,
                                               jax.random.PRNGKey(B * 7919 + ctx) if key is None else key)
    scale = Dh**-0.5
    want = jax.jit(xla_ref, static_argnums=5)(q, kp, vp, tables, lengths, scale)
    timings: dict[str, tuple[float, DecodeConfig]] = {}  # by config name: ms, config
    failed: list[str] = []

    def timed(cfg: DecodeConfig) -> float | None:
        cfg = _explicit(cfg, B, KVH)
        if cfg.name in timings:
            return timings[cfg.name][0]
        fn = jax.jit(functools.partial(paged_decode_attention, scale=scale, interpret=interpret,
                                       **dataclasses.asdict(cfg)))
        try:
            err = rel_err(fn(q, kp, vp, tables, lengths), want)
            if err > 2e-2:
                raise AssertionError(f"{cfg.name} wrong at B={B} ctx={ctx}: rel err {err}")
            timings[cfg.name] = (time_ms(fn, q, kp, vp, tables, lengths, reps=reps), cfg)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - a config the compiler refuses
            failed.append(f"{cfg.name}: {type(e).__name__}: {str(e)[:200]}")
            return None
        return timings[cfg.name][0]

    def best_of(cfgs: list[DecodeConfig]) -> DecodeConfig:
        ok = [(t, c) for c in cfgs if (t := timed(c)) is not None]
        return _explicit(min(ok, key=lambda tc: tc[0])[1], B, KVH)

    best = best_of(first_round(H, KVH) if first is None else first)
    best = best_of([best] + [dataclasses.replace(best, splits=s) for s in splits])
    best = best_of([best] + [dataclasses.replace(best, num_stages=n)
                             for n in (best.num_stages - 1, best.num_stages + 1) if n >= 1])
    default_ms = timed(DEFAULT)
    # the rounds are greedy: a config dropped early (or the default) can still time fastest, and
    # the table stores the fastest one timed
    ms, best = min(timings.values(), key=lambda tc: tc[0])
    moved = bytes_moved(B, H, KVH, Dh, B * ctx, jnp.dtype(dtype).itemsize)
    return {"q_heads": H, "kv_heads": KVH, "head_dim": Dh, "batch": B, "context": ctx, "config": best.to_dict(),
            "ms": ms, "TBps": moved / ms / 1e9, "default_ms": default_ms, "configs_timed": len(timings),
            "all_ms": {name: t for name, (t, _) in sorted(timings.items(), key=lambda kv: kv[1][0])}, "failed": failed}


def main(args: argparse.Namespace) -> int:
    interpret = jax.default_backend() != "gpu"
    read = read_bandwidth() if not interpret else None
    entries: list[dict[str, Any]] = []
    out = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "read_TBps": read,
           "page_size": PAGE, "entries": entries}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for layout in args.layouts.split(","):
        H, KVH, Dh = (int(x) for x in layout.split(":"))
        for ctx in (int(c) for c in args.contexts.split(",")):
            for B in (int(b) for b in args.batches.split(",")):
                e = tune_shape(B, ctx, H, KVH, Dh, interpret=interpret, reps=args.reps,
                               dtype=jnp.float32 if interpret else jnp.bfloat16)
                e["device_kind"] = jax.devices()[0].device_kind
                if read:
                    e["read_share"] = e["TBps"] / read
                entries.append(e)
                share = f" {e['read_share']:.0%} of read" if read else ""
                print(f"H{H}/KV{KVH} B={B:4d} ctx={ctx:5d}: {e['ms']:.3f} ms {e['TBps']:.2f} TB/s{share}, "
                      f"{DecodeConfig(**e['config']).name} (default {e['default_ms']:.3f} ms; "
                      f"{e['configs_timed']} timed)", flush=True)
                Path(args.out).write_text(json.dumps(out, indent=1))  # after each shape: a cut run keeps them
    print(f"wrote {args.out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layouts", default="40:40:128,32:8:128", help="q_heads:kv_heads:head_dim, comma-separated")
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--reps", type=int, default=20, help="calls back to back per timing")
    p.add_argument("--out", default="pallas_kernels/decode_tuning.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python3 -m bench.decode_tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
