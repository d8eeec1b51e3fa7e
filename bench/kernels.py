"""Attention kernels on the GPU, side by side in one run (one device call):

- decode: this project's paged decode kernel, jax's own Pallas ``paged_attention`` (its head-major
  page layout), and the XLA path (the engine's plain-jnp reference), at several batch sizes and
  contexts; effective bandwidth = bytes that must move (every cached K/V row once, q, out) / time;
- prefill: this project's packed causal kernel, jax's Pallas ``attention.mha``, cuDNN through
  ``jax.nn.dot_product_attention(implementation="cudnn")`` and XLA, on prompts of equal length (what
  cuDNN and mha take) and on a packed mix of lengths (ours only: the others would pad); TFLOP/s =
  useful causal FLOPs / time;
- prefix prefill: this project's paged prefill kernel (packed chunks over their cached prefix, read
  through the page tables), the per-token path it replaced (every query token one row of the paged
  decode kernel) and the XLA reference, for OPT-13B's and LLaMA-3-8B's heads: chunks of 512 and 2048
  tokens after cached prefixes of 0, 512 and 1536, and a chunked-prefill step (a chunk and 128 decode
  tokens); TFLOP/s = useful FLOPs (each query over its position + 1 keys) / time, and the KV each
  reads (a model of its loads; "needed" = every K/V row of the step's sequences once).

Each kernel is checked against the XLA path (prefix prefill: against the per-token path, since XLA's
gather outgrows the GPU at the larger shapes) before it is timed (bf16: relative error < 2e-2). Times
are medians of event-timed runs after warm-up. Prints a table and writes JSON.

    python -m bench.kernels --out bench/results/kernels-h100.json
    python -m bench.kernels --prefix-only --out bench/results/prefix-h200.json
    python -m bench.kernels --prefix-only --small   # tiny shapes, interpreted on a CPU: does it run?
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.engine_micro import back_to_back_ms


def time_ms(fn, *args, reps: int = 30) -> float:
    """Per call, from ``reps`` calls dispatched back to back (median of 5 such runs)."""
    return back_to_back_ms(lambda _: fn(*args), reps, 5)


# (pages per block, warps, pipeline stages, KV heads a program) tried for this project's decode kernel;
# "wide" sweeps one head a program, "heads" several
DECODE_CONFIGS = {"default": ((8, 4, 2, 1), (8, 4, 3, 1), (4, 4, 4, 1), (16, 8, 4, 1)),
                  "wide": tuple((p, w, st, 1) for p in (4, 8, 16, 32) for w in (4, 8) for st in (1, 2, 3, 4)),
                  "heads": ((4, 4, 1, 1),) + tuple((p, w, st, hb) for hb in (2, 4, 8) for p in (1, 2, 4)
                                                  for w in (4, 8) for st in (1, 2))}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(1e-9, np.linalg.norm(b)))


def _decode_variants(configs, W: int, B: int, KVH: int, scale: float, interpret: bool):
    """(name, jitted kernel) for each config that fits the shape, each with one split and with the
    number that fills the GPU; ``configs`` None: the kernel's own defaults, as the engine calls it."""
    from pallas_kernels.paged_decode_attention import paged_decode_attention

    if configs is None:
        yield "defaults", jax.jit(functools.partial(paged_decode_attention, scale=scale, interpret=interpret))
        return
    for ppb, warps, stages, hb in configs:
        if W % ppb or KVH % hb:
            continue
        s_auto = max(1, min(W // ppb, math.ceil(264 / (B * KVH // hb))))
        for splits in sorted({1, s_auto}):
            yield (f"ppb{ppb}/s{splits}/w{warps}/st{stages}/h{hb}",
                   jax.jit(functools.partial(paged_decode_attention, scale=scale, pages_per_block=ppb, splits=splits,
                                             heads_per_program=hb, num_warps=warps, num_stages=stages,
                                             interpret=interpret)))


def decode_inputs(B: int, ctx: int, H: int, KVH: int, Dh: int, ps: int, dtype, key: jax.Array):
    """Random q, a pool of ``B * ctx / ps`` pages (plus the null page) and page tables that scatter
    each sequence over it, every sequence ``ctx`` tokens long: (q, k_pages, v_pages, tables, lengths)."""
    W = ctx // ps
    P = B * W + 1
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (B, H, Dh), dtype)
    kp = jax.random.normal(k2, (P, ps, KVH, Dh), dtype)
    vp = jax.random.normal(k3, (P, ps, KVH, Dh), dtype)
    tables = jnp.asarray(np.random.default_rng(B + ctx).permutation(P - 1)[: B * W].reshape(B, W) + 1, jnp.int32)
    return q, kp, vp, tables, jnp.full((B,), ctx, jnp.int32)


def decode_suite(batches, contexts, H, KVH, Dh, ps=16, dtype=jnp.bfloat16, configs=DECODE_CONFIGS["default"],
                 interpret: bool = False, reps: int = 30):
    """Each shape: the XLA reference, this project's kernel in each of ``configs`` (the fastest kept),
    and jax's Pallas ``paged_attention`` (not in the interpreter); times and effective TB/s."""
    from jax.experimental.pallas.ops.gpu import paged_attention as upstream

    from distllm_jax.models.attention import paged_decode_attention as xla_ref
    from pallas_kernels.paged_decode_attention import bytes_moved, paged_decode_attention

    rows = []
    key = jax.random.PRNGKey(0)
    for ctx in contexts:
        for B in batches:
            W = ctx // ps
            k1, key = jax.random.split(key)
            q, kp, vp, tables, lengths = decode_inputs(B, ctx, H, KVH, Dh, ps, dtype, k1)
            scale = Dh**-0.5
            ref = jax.jit(xla_ref, static_argnums=5)
            want = ref(q, kp, vp, tables, lengths, scale)
            moved = bytes_moved(B, H, KVH, Dh, B * ctx, jnp.dtype(dtype).itemsize)
            row = {"batch": B, "context": ctx, "q_heads": H, "kv_heads": KVH, "head_dim": Dh, "MB": moved / 1e6}
            row["xla_ms"] = time_ms(ref, q, kp, vp, tables, lengths, scale, reps=reps)
            best = None
            for name, fn in _decode_variants(configs, W, B, KVH, scale, interpret):
                try:
                    err = rel_err(fn(q, kp, vp, tables, lengths), want)
                    ms = time_ms(fn, q, kp, vp, tables, lengths, reps=reps)
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses
                    why = f": {str(e)[:300]}" if not row.get("failed_configs") else ""  # the first in full
                    row.setdefault("failed_configs", []).append(f"{name}: {type(e).__name__}{why}")
                    continue
                if err > 2e-2:
                    raise AssertionError(f"ours wrong at {row}: rel err {err}")
                row.setdefault("ours_all_ms", {})[name] = ms
                if best is None or ms < best[0]:
                    best = (ms, name, err)
            row["ours_ms"], row["ours_config"], row["ours_err"] = best
            if configs is None:
                # the same kernel and launch choices on pages laid out head-major ([P, KVH, ps, Dh]),
                # where one head's share of a page is one contiguous read: what a pool in that layout
                # would gain
                kt, vt = jnp.transpose(kp, (0, 2, 1, 3)), jnp.transpose(vp, (0, 2, 1, 3))
                fn = jax.jit(functools.partial(paged_decode_attention, scale=scale, head_major=True,
                                               interpret=interpret))
                err = rel_err(fn(q, kt, vt, tables, lengths), want)
                if err > 2e-2:
                    raise AssertionError(f"ours (head-major) wrong at {row}: rel err {err}")
                row["head_major_ms"] = time_ms(fn, q, kt, vt, tables, lengths, reps=reps)
                del kt, vt
            # upstream wants [kv_heads, pages, page_size, head_dim] and applies no softmax scale: pre-scale q
            kh, vh = jnp.transpose(kp, (2, 0, 1, 3)), jnp.transpose(vp, (2, 0, 1, 3))
            q_up = (q.astype(jnp.float32) * scale).astype(dtype)
            up = None
            for ppb in () if interpret else (8,):
                for splits in (1, 16):
                    if W % splits or (W // splits) % min(ppb, W // splits):
                        continue
                    fn = jax.jit(functools.partial(upstream.paged_attention, pages_per_compute_block=ppb, k_splits=splits))
                    try:
                        err = rel_err(fn(q_up, kh, vh, tables, lengths), want)
                        ms = time_ms(fn, q_up, kh, vh, tables, lengths, reps=reps)
                    except Exception as e:  # noqa: BLE001
                        row.setdefault("upstream_errors", []).append(f"ppb{ppb}/s{splits}: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    if up is None or ms < up[0]:
                        up = (ms, f"ppb{ppb}/s{splits}", err)
            if up:
                row["upstream_ms"], row["upstream_config"], row["upstream_err"] = up
            for name in ("xla", "ours", "head_major", "upstream"):
                if f"{name}_ms" in row:
                    row[f"{name}_TBps"] = moved / row[f"{name}_ms"] / 1e9
            rows.append(row)
            ranked = sorted(row.get("ours_all_ms", {}).items(), key=lambda kv: kv[1])
            print("  configs, fastest first:", ", ".join(f"{c} {ms:.3f}" for c, ms in ranked[:6]),
                  "... slowest", ", ".join(f"{c} {ms:.3f}" for c, ms in ranked[-2:]), flush=True)
            print(f"decode B={B:4d} ctx={ctx:5d}: ours {row['ours_ms']:.3f} ms ({row['ours_TBps']:.2f} TB/s, "
                  f"{row['ours_config']}), upstream {row.get('upstream_ms', float('nan')):.3f} ms, "
                  f"xla {row['xla_ms']:.3f} ms", flush=True)
    return rows


def _add_tflops(row: dict, flops: float, names) -> None:
    for name in names:
        if f"{name}_ms" in row:
            row[f"{name}_TFLOPs"] = flops / row[f"{name}_ms"] / 1e9


def prefill_suite(cases, H, KVH, Dh, dtype=jnp.bfloat16):
    from jax.experimental.pallas.ops.gpu import attention as upstream

    from pallas_kernels.packed_prefill_attention import causal_flops, packed_prefill_attention

    rows = []
    key = jax.random.PRNGKey(1)
    for lengths in cases:
        T = sum(lengths)
        k1, k2, k3, key = jax.random.split(key, 4)
        q = jax.random.normal(k1, (T, H, Dh), dtype)
        k = jax.random.normal(k2, (T, KVH, Dh), dtype)
        v = jax.random.normal(k3, (T, KVH, Dh), dtype)
        seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths), jnp.int32)
        pos = jnp.asarray(np.concatenate([np.arange(n) for n in lengths]), jnp.int32)
        scale = Dh**-0.5
        flops = causal_flops(lengths, H, Dh)
        equal = len(set(lengths)) == 1
        row = {"lengths": lengths if len(lengths) <= 8 else f"{len(lengths)} prompts", "tokens": T, "q_heads": H,
               "kv_heads": KVH, "head_dim": Dh, "GFLOP": flops / 1e9}
        # XLA: one causal attention per prompt when lengths are equal (batched), packed mask otherwise
        if equal:
            B, L = len(lengths), lengths[0]
            qb, kb, vb = (x.reshape(B, L, x.shape[1], Dh) for x in (q, k, v))
            xla = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, is_causal=True, scale=scale,
                                                                     implementation="xla"))
            want = xla(qb, kb, vb).reshape(T, H, Dh)
            row["xla_ms"] = time_ms(xla, qb, kb, vb)
            cud = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, is_causal=True, scale=scale,
                                                                     implementation="cudnn"))
            try:
                err = rel_err(cud(qb, kb, vb).reshape(T, H, Dh), want)
                row["cudnn_ms"], row["cudnn_err"] = time_ms(cud, qb, kb, vb), err
            except Exception as e:  # noqa: BLE001
                row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if KVH == H:
                mha = jax.jit(functools.partial(upstream.mha, segment_ids=None, causal=True, sm_scale=scale))
                try:
                    err = rel_err(mha(qb, kb, vb).reshape(T, H, Dh), want)
                    row["upstream_mha_ms"], row["upstream_mha_err"] = time_ms(mha, qb, kb, vb), err
                except Exception as e:  # noqa: BLE001
                    row["upstream_mha_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        else:
            from distllm_jax.models.attention import packed_causal_attention

            xla = jax.jit(packed_causal_attention, static_argnums=5)
            want = xla(q, k, v, seg, pos, scale)
            row["xla_ms"] = time_ms(xla, q, k, v, seg, pos, scale)
        best = None
        for bq, bk, warps, stages in ((64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 2)):
            fn = jax.jit(functools.partial(packed_prefill_attention, scale=scale, block_q=bq, block_k=bk,
                                           num_warps=warps, num_stages=stages))
            try:
                err = rel_err(fn(q, k, v, seg, pos), want)
                ms = time_ms(fn, q, k, v, seg, pos)
            except Exception as e:  # noqa: BLE001
                row.setdefault("failed_configs", []).append(f"{bq}x{bk}/w{warps}/s{stages}: {type(e).__name__}")
                continue
            if err > 2e-2:
                raise AssertionError(f"ours wrong at {row['lengths']}: rel err {err}")
            if best is None or ms < best[0]:
                best = (ms, f"{bq}x{bk}/w{warps}/s{stages}", err)
        row["ours_ms"], row["ours_config"], row["ours_err"] = best
        _add_tflops(row, flops, ("xla", "ours", "cudnn", "upstream_mha"))
        rows.append(row)
        print(f"prefill {row['lengths']}: ours {row['ours_ms']:.3f} ms ({row['ours_TFLOPs']:.0f} TFLOP/s, "
              f"{row['ours_config']}), cudnn {row.get('cudnn_TFLOPs', float('nan')):.0f}, "
              f"mha {row.get('upstream_mha_TFLOPs', float('nan')):.0f}, xla {row['xla_TFLOPs']:.0f}", flush=True)
    return rows


# (rows of a program's tile, pages per block, warps, pipeline stages) tried for the paged prefill kernel
PREFIX_CONFIGS = ((64, 4, 4, 2), (64, 4, 4, 3), (64, 8, 4, 2), (128, 4, 8, 2), (128, 2, 8, 3))
# (q heads, kv heads, head dim) of the models the prefix section runs
PREFIX_MODELS = {"OPT-13B": (40, 40, 128), "LLaMA-3-8B": (32, 8, 128)}
# each case: the step's segments as (cached prefix, new tokens); the last is a chunked-prefill step
PREFIX_CASES = [[(p, n)] for n in (512, 2048) for p in (0, 512, 1536)] + [[(1024, 1024)] + [(2047, 1)] * 128]
PREFIX_SMALL = {"models": {"MHA": (4, 4, 32), "GQA": (8, 2, 32)},
                "cases": [[(0, 32)], [(40, 32)], [(24, 16)] + [(50, 1)] * 4], "configs": PREFIX_CONFIGS[:2]}


def _prefix_step(segments, ps: int, H: int, KVH: int, Dh: int, dtype, seed: int):
    """One layer's pool holding every segment's prefix and new tokens (pages scattered), the step's
    queries, page tables (one row per segment) and packed segment ids and positions."""
    rng = np.random.default_rng(seed)
    need = [-(-(p + n) // ps) for p, n in segments]
    W, P = max(need), sum(need) + 1
    pages = iter(rng.permutation(P - 1) + 1)
    tables = np.zeros((len(segments), W), np.int32)
    for i, m in enumerate(need):
        tables[i, :m] = [next(pages) for _ in range(m)]
    seg = np.concatenate([np.full(n, i) for i, (_, n) in enumerate(segments)]).astype(np.int32)
    pos = np.concatenate([np.arange(p, p + n) for p, n in segments]).astype(np.int32)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(k1, (len(seg), H, Dh), dtype)
    kp = jax.random.normal(k2, (P, ps, KVH, Dh), dtype)
    vp = jax.random.normal(k3, (P, ps, KVH, Dh), dtype)
    return q, kp, vp, jnp.asarray(tables), jnp.asarray(seg), jnp.asarray(pos)


def _prefill_keys_read(segments, block_q: int, keys_per_block: int) -> int:
    """Key rows the paged prefill kernel loads per KV head: each block of at most ``block_q`` tokens
    of one segment reads its sequence's key blocks up to its highest position."""
    return sum(-(-(p + min(j + block_q, n)) // keys_per_block) * keys_per_block
               for p, n in segments for j in range(0, n, block_q))


def prefix_suite(cases, H, KVH, Dh, ps=16, dtype=jnp.bfloat16, configs=PREFIX_CONFIGS, interpret=False, reps=30,
                 xla_gb=24.0):
    """Packed queries over their cached prefix through the pool: the paged prefill kernel, the per-token
    path (every query token one row of the paged decode kernel, as chunked steps ran before it) and
    the XLA reference (which gathers the table's whole width per token: skipped past ``xla_gb``)."""
    from distllm_jax.models.attention import paged_prefix_attention
    from pallas_kernels import paged_decode_attention, paged_prefill_attention

    def per_token(q, kp, vp, tables, seg, pos):
        return paged_decode_attention(q, kp, vp, tables[seg], pos + 1, Dh**-0.5, interpret=interpret)

    rows = []
    G = H // KVH
    kv_row = 2 * KVH * Dh * jnp.dtype(dtype).itemsize  # one token's K and V, all KV heads
    for n_case, segments in enumerate(cases):
        args = _prefix_step(segments, ps, H, KVH, Dh, dtype, seed=n_case)
        T, W = args[0].shape[0], args[3].shape[1]
        ctx = np.asarray(args[5]) + 1
        flops = 4.0 * H * Dh * float(ctx.sum())
        label = ", ".join(f"{n}@{p}" for p, n in segments[:2])
        if len(segments) > 2:
            label += f" + {len(segments) - 2} more"
        row = {"segments": label, "tokens": T, "q_heads": H, "kv_heads": KVH, "head_dim": Dh, "GFLOP": flops / 1e9,
               "kv_MB_needed": sum(p + n for p, n in segments) * kv_row / 1e6}
        old = jax.jit(per_token)
        want = old(*args)
        row["per_token_ms"] = time_ms(old, *args, reps=reps)
        blk = min(4, 1 << (W - 1).bit_length()) * ps  # the decode kernel's default 4 pages a loop step
        row["per_token_kv_MB"] = float((-(-ctx // blk) * blk).sum()) * kv_row / 1e6
        gathered = T * W * ps * kv_row
        if gathered <= xla_gb * 1e9:
            xla = jax.jit(paged_prefix_attention, static_argnums=6)
            row["xla_err"] = rel_err(xla(*args, Dh**-0.5), want)
            if row["xla_err"] > 2e-2:
                raise AssertionError(f"the per-token path and XLA disagree at {row}")
            row["xla_ms"], row["xla_kv_MB"] = time_ms(xla, *args, Dh**-0.5, reps=reps), gathered / 1e6
        best = None
        for tile, ppb, warps, stages in configs:
            bq = max(1, tile // G)
            fn = jax.jit(functools.partial(paged_prefill_attention, scale=Dh**-0.5, block_q=bq, pages_per_block=ppb,
                                           num_warps=warps, num_stages=stages, interpret=interpret))
            name = f"q{bq}/ppb{ppb}/w{warps}/st{stages}"
            try:
                err = rel_err(fn(*args), want)
                ms = time_ms(fn, *args, reps=reps)
            except Exception as e:  # noqa: BLE001 - a config the compiler refuses
                row.setdefault("failed_configs", []).append(f"{name}: {type(e).__name__}")
                continue
            if err > 2e-2:
                raise AssertionError(f"ours wrong at {row}: rel err {err}")
            row.setdefault("ours_all_ms", {})[name] = ms
            if best is None or ms < best[0]:
                keys = _prefill_keys_read(segments, bq, min(ppb, 1 << (W - 1).bit_length()) * ps)
                best = (ms, name, err, keys * kv_row / 1e6)
        row["ours_ms"], row["ours_config"], row["ours_err"], row["ours_kv_MB"] = best
        _add_tflops(row, flops, ("ours", "per_token", "xla"))
        rows.append(row)
        print(f"prefix {label} ({H}/{KVH} heads): ours {row['ours_ms']:.3f} ms ({row['ours_TFLOPs']:.3g} TFLOP/s, "
              f"{row['ours_config']}), per-token {row['per_token_ms']:.3f} ms, "
              f"xla {row.get('xla_ms', float('nan')):.3f} ms", flush=True)
    return rows


def prefix_sections(small: bool) -> dict[str, list]:
    """The prefix section for each model (tiny shapes in the interpreter off the GPU with ``small``)."""
    models, cases, configs = PREFIX_MODELS, PREFIX_CASES, PREFIX_CONFIGS
    kw = {}
    if small:
        models, cases, configs = PREFIX_SMALL["models"], PREFIX_SMALL["cases"], PREFIX_SMALL["configs"]
        kw = {"interpret": jax.default_backend() != "gpu", "reps": 1}
    return {name: prefix_suite(cases, H, KVH, Dh, configs=configs, **kw) for name, (H, KVH, Dh) in models.items()}


def print_prefix(sections: dict[str, list]) -> None:
    print(f"\n{'prefix prefill (new@cached)':>32}{'ours':>9}{'per-tok':>9}{'xla':>9}  ms | TFLOP/s ours, per-tok, "
          "xla | KV MB read ours, per-tok, xla (needed)")
    for model, rows in sections.items():
        for r in rows:
            ms = [r.get(f"{k}_ms", float("nan")) for k in ("ours", "per_token", "xla")]
            tf = [r.get(f"{k}_TFLOPs", float("nan")) for k in ("ours", "per_token", "xla")]
            mb = [r.get(f"{k}_kv_MB", float("nan")) for k in ("ours", "per_token", "xla")]
            print(f"{model + ' ' + r['segments']:>32}" + "".join(f"{x:>9.3f}" for x in ms)
                  + " | " + ", ".join(f"{x:.3g}" for x in tf) + " | " + ", ".join(f"{x:.4g}" for x in mb)
                  + f" ({r['kv_MB_needed']:.4g})")


def head_dim_80_check() -> dict:
    """Does each kernel compile and agree with XLA at a head size that is not a power of two?"""
    from distllm_jax.models.attention import packed_causal_attention, paged_decode_attention as dref
    from pallas_kernels import packed_prefill_attention, paged_decode_attention

    out = {}
    r = np.random.default_rng(0)
    q = jnp.asarray(r.standard_normal((2, 8, 80)), jnp.bfloat16)
    kp = jnp.asarray(r.standard_normal((9, 16, 8, 80)), jnp.bfloat16)
    t = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    n = jnp.asarray([50, 64], jnp.int32)
    try:
        out["decode_rel_err"] = rel_err(paged_decode_attention(q, kp, kp, t, n, 0.1), dref(q, kp, kp, t, n, 0.1))
    except Exception as e:  # noqa: BLE001
        out["decode_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    qq = jnp.asarray(r.standard_normal((64, 8, 80)), jnp.bfloat16)
    seg = jnp.asarray([0] * 40 + [1] * 24, jnp.int32)
    pos = jnp.asarray(list(range(40)) + list(range(24)), jnp.int32)
    try:
        out["prefill_rel_err"] = rel_err(packed_prefill_attention(qq, qq, qq, seg, pos, 0.1),
                                      packed_causal_attention(qq, qq, qq, seg, pos, 0.1))
    except Exception as e:  # noqa: BLE001
        out["prefill_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def copy_bandwidth() -> float:
    x = jnp.ones((1 << 28,), jnp.bfloat16)  # 512 MiB
    f = jax.jit(lambda a: a * 1)
    ms = time_ms(f, x)
    return 2 * x.size * 2 / ms / 1e9


def read_bandwidth(passes: int = 20, repeats: int = 5) -> float:
    """Bytes read per second (TB/s) by a reduction over 1 GiB of bf16 on a GPU (the rate a decode
    kernel, which only reads, is bounded by); three buffers in turn, so no pass finds its input in
    the L2 cache."""
    n = (1 << 30) // 2 if jax.default_backend() == "gpu" else 1 << 22
    bufs = [jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.bfloat16) for i in range(3)]
    f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    ms = back_to_back_ms(lambda i: f(bufs[i % 3]), passes, repeats)
    return n * 2 / ms / 1e9


def main(args: argparse.Namespace) -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    if args.prefix_only:
        res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "prefix_prefill": prefix_sections(args.small)}
        print_prefix(res["prefix_prefill"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")
        return 0
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_TBps": copy_bandwidth(),
           "read_TBps": read_bandwidth()}
    print(f"{res['device']}, jax {res['jax']}: elementwise read+write {res['copy_TBps']:.2f} TB/s, "
          f"read {res['read_TBps']:.2f} TB/s", flush=True)
    configs = DECODE_CONFIGS[args.decode_configs]
    res["decode"] = decode_suite(ints(args.batches), ints(args.contexts), args.heads, args.kv_heads, args.head_dim,
                                 configs=configs)
    if args.gqa_kv_heads:
        res["decode_gqa"] = decode_suite(ints(args.batches), ints(args.contexts), args.heads, args.gqa_kv_heads,
                                         args.head_dim, configs=configs)
    res["prefill"] = []
    if not args.decode_only:
        res["head_dim_80"] = head_dim_80_check()
        print(f"head_dim 80: {res['head_dim_80']}", flush=True)
        cases = [[2048] * 4, [4096] * 2, [512] * 16, [1900, 700, 3000, 25, 1000, 1567]]
        res["prefill"] = prefill_suite(cases, args.heads, args.heads, args.head_dim)
        res["prefix_prefill"] = prefix_sections(small=False)
    for r in res["decode"] + res.get("decode_gqa", []):
        r["read_share"] = r["ours_TBps"] / res["read_TBps"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    errs = {e for r in res["decode"] for e in r.get("upstream_errors", [])}
    if errs:
        print("upstream paged_attention errors:", *sorted(errs)[:3], sep="\n  ")
    print(f"\n{'decode B':>9}{'ctx':>6}{'ours TB/s':>11}{'of read':>9}{'upstream':>10}{'xla':>8}   "
          f"(read {res['read_TBps']:.2f}, copy {res['copy_TBps']:.2f} TB/s)")
    for r in res["decode"] + res.get("decode_gqa", []):
        print(f"{r['batch']:>9}{r['context']:>6}{r['ours_TBps']:>11.2f}{r['read_share']:>9.0%}"
              f"{r.get('upstream_TBps', float('nan')):>10.2f}"
              f"{r['xla_TBps']:>8.2f}   kv_heads {r['kv_heads']}  (rel err vs XLA: ours {r['ours_err']:.1e}, "
              f"upstream {r.get('upstream_err', float('nan')):.1e})")
    print(f"\n{'prefill':>28}{'ours':>8}{'cudnn':>8}{'mha':>8}{'xla':>8}  TFLOP/s")
    for r in res["prefill"]:
        print(f"{str(r['lengths']):>28}{r['ours_TFLOPs']:>8.0f}{r.get('cudnn_TFLOPs', float('nan')):>8.0f}"
              f"{r.get('upstream_mha_TFLOPs', float('nan')):>8.0f}{r['xla_TFLOPs']:>8.0f}")
    print_prefix(res.get("prefix_prefill", {}))
    print(f"wrote {args.out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--gqa-kv-heads", type=int, default=8, help="also time GQA with this many KV heads (0: skip)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decode-configs", default="default", choices=sorted(DECODE_CONFIGS))
    p.add_argument("--decode-only", action="store_true", help="skip the prefill kernels")
    p.add_argument("--prefix-only", action="store_true",
                   help="only the prefix section: packed chunks over their cached prefix through the pool")
    p.add_argument("--small", action="store_true",
                   help="with --prefix-only: tiny shapes (the interpreter off the GPU), to check the bench runs")
    p.add_argument("--out", default="bench/results/kernels.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
