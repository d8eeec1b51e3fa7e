"""The engine on one GPU at real model sizes: decode step time against the memory-bound floor, prefill
model-FLOP utilisation against the measured matmul rate, where a decode step's time goes (kernel
trace), and Hugging Face ``transformers`` generating the same batch side by side.

One run does one or more parts; each part writes ``<out>/<part>-<device>.json`` and prints a table
(the tables are repeated at the end, so the last lines of the output hold them all):

    python3 -m bench.gpu_suite --parts ceilings,decode,prefill --models opt-1.3b,opt-6.7b --out bench/results/gpu-suite
    python3 -m bench.gpu_suite --parts trace --models opt-1.3b --out bench/results/gpu-suite
    python3 -m bench.gpu_suite --parts e2e,hf --models opt-1.3b --out bench/results/gpu-suite
    python3 -m bench.gpu_suite --parts start,sampling --models opt-13b --out bench/results/gpu-suite

Weights are random (:class:`DeviceRandomSource`, drawn on the GPU) in bf16, with the real configs.
The *floor* of a decode step is the bytes it must read (weights + each sequence's KV) over the read-only
streaming rate measured in the same process (*x copy*: over the copy rate, read + write bytes, which
understates what a step that only reads can get); *MFU* is the model's FLOPs (2 per weight per token, plus the
causal attention's 2·L²·H·Dh per layer) over the step time and the measured bf16 matmul rate.
*engine ms* is a whole engine step as serving runs it (host packing, host->device copies, the step,
the token ids back; decode steps with the serving loop's lookahead, step k+1 dispatched before step k
is read), *sync ms* the same decode step packed, run and read in turn; *device ms* is the same
program replayed with its inputs already on the device, so ``1 - device/engine`` is the host's share
of the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.engine_micro import back_to_back_ms, median_ms  # noqa: E402
from bench.kernels import read_bandwidth  # noqa: E402
from distllm_jax.models.params import param_count  # noqa: E402
from distllm_jax.placement.profiler import decode_step_ms, run_decode_steps  # noqa: E402

TABLES: list[str] = []  # every part's table, printed again at the end


def _emit(lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text, flush=True)
    TABLES.append(text)


def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    stats = d.memory_stats() or {}
    return {"device": d.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "memory_limit_gib": round(stats.get("bytes_limit", 0) / 2**30, 1)}


def device_tag() -> str:
    kind = jax.devices()[0].device_kind.lower()
    for name in ("h200", "h100", "a100"):
        if name in kind:
            return name
    return jax.default_backend()


# ---- ceilings -------------------------------------------------------------------------------------


def ceilings(repeats: int = 10, passes: int = 20) -> dict[str, Any]:
    """The rates every other number is compared with, measured here: an elementwise pass over a
    large bf16 buffer (bytes read + written: the copy rate), a reduction over it (bytes read only,
    what a decode step does: the rate its floor uses), and a large bf16 matrix product (random
    data)."""
    key = jax.random.PRNGKey(0)
    n = (1 << 30) // 2 if jax.default_backend() == "gpu" else 1 << 22  # 1 GiB of bf16 on a GPU
    bufs = [jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.bfloat16) for i in range(3)]
    step = jax.jit(lambda x: x * 1.0009765625 + 1)
    copy_ms = back_to_back_ms(lambda i: step(bufs[i % 3]), passes, repeats)
    copy_tbps = 2 * n * 2 / (copy_ms * 1e-3) / 1e12
    read_tbps = read_bandwidth(passes, repeats)
    m = 8192 if jax.default_backend() == "gpu" else 512
    a = [jax.random.normal(jax.random.fold_in(key, 10 + i), (m, m), jnp.bfloat16) for i in range(3)]
    mm = jax.jit(lambda x, y: x @ y)
    mm_ms = back_to_back_ms(lambda i: mm(a[i % 3], a[(i + 1) % 3]), passes, repeats)
    tflops = 2 * m**3 / (mm_ms * 1e-3) / 1e12
    del bufs, a
    out = {"copy_tb_per_s": copy_tbps, "copy_bytes": 2 * n * 2, "read_tb_per_s": read_tbps,
           "matmul_tflop_per_s": tflops, "matmul_n": m, "timing": f"{passes} passes back to back"}
    _emit([f"ceilings on {device_info()['device']}: elementwise read+write {copy_tbps:.2f} TB/s, "
           f"read (sum) {read_tbps:.2f} TB/s, bf16 {m}^3 matmul {tflops:.0f} TFLOP/s"])
    return out


# ---- model pieces ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    name: str
    cfg: Any
    dtype: str = "bfloat16"

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    def weight_bytes(self) -> int:
        return param_count(self.cfg) * self.itemsize

    def kv_bytes_per_token(self) -> int:
        c = self.cfg
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.itemsize

    def linear_params(self) -> int:
        """Weights that multiply every token (the layers' matrices; not their biases, whose per-head
        layout is 2-D too, nor the norms)."""
        from distllm_jax.models.params import tensor_specs

        return sum(math.prod(s.shape) for s in tensor_specs(self.cfg)
                   if s.name.startswith("layers.") and s.transpose)

    def prefill_flops(self, prompt_lens: list[int]) -> float:
        c = self.cfg
        T = sum(prompt_lens)
        linear = 2 * self.linear_params() * T
        head = 2 * len(prompt_lens) * c.hidden_size * c.vocab_size  # logits only for each prompt's last token
        attn = sum(2 * L * L * c.num_heads * c.head_dim for L in prompt_lens) * c.num_layers
        return float(linear + head + attn)


def load_model(name: str) -> Model:
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset

    return Model(name, ModelConfig.from_hf_dict(preset(name)))


def make_instance(model: Model, role: str, num_pages: int, max_len: int, *, batch: int = 256,
                  budget: int = 8192, attention: str = "auto"):
    from distllm_jax.engine import DeviceRandomSource, EngineConfig, InstanceSpec
    from distllm_jax.engine.engine import attention_impl
    from distllm_jax.engine.instance import Instance

    ecfg = EngineConfig(page_size=16, num_pages=num_pages, max_seq_len=max_len, prefill_token_budget=budget,
                        max_prefill_seqs=16, max_decode_batch=batch, dtype=model.dtype, attention=attention,
                        progress=False)
    src = DeviceRandomSource(model.cfg, model.dtype, seed=0)
    return Instance(f"{role}0", role, InstanceSpec(1, num_pages=num_pages), jax.devices()[:1], src, ecfg,
                    attention_impl(attention))


@functools.lru_cache(maxsize=None)
def _filler(shape: tuple[int, ...], dtype: Any, sharding: Any):
    # keep_unused: a pruned argument would not be donated, and the pool would briefly exist twice
    return jax.jit(lambda a, key: (jax.random.normal(key, shape, dtype) * 0.5), donate_argnums=0,
                   keep_unused=True, out_shardings=sharding)


def fill_pools(inst, seed: int = 1) -> None:
    """Random K/V everywhere (never time attention over zeros), drawn in the pool's own dtype in place
    of each donated layer array."""
    key = jax.random.PRNGKey(seed)
    inst.fill_pools(lambda a, i: _filler(a.shape, a.dtype, a.sharding)(a, jax.random.fold_in(key, i)))


def _segments(inst, batch: int, ctx: int, rng: np.random.Generator, kind: str):
    """``batch`` segments with pages of their own: decode tokens at position ``ctx``, or prompts of
    ``ctx`` tokens; returns them with the request ids that hold their pages."""
    from distllm_jax.engine import SamplingParams
    from distllm_jax.engine.programs import Segment

    sp = SamplingParams(max_tokens=1)
    segs, rids = [], []
    for i in range(batch):
        rid = f"{kind}-{batch}-{ctx}-{i}"
        rids.append(rid)
        if kind == "decode":
            inst.alloc.ensure(rid, ctx + 1)
            segs.append(Segment([int(rng.integers(0, 1000))], ctx, list(inst.alloc.table(rid)), sp, i))
        else:
            inst.alloc.ensure(rid, ctx)
            segs.append(Segment(rng.integers(3, 1000, ctx).tolist(), 0, list(inst.alloc.table(rid)), sp, i))
    return segs, rids


def _release(inst, rids) -> None:
    """Free the pages :func:`_segments` took."""
    for rid in rids:
        if not inst.alloc.free(rid):
            raise AssertionError(f"no pages for {rid}")


def _device_loop_ms(inst, kind: str, segs, steps: int = 20) -> float:
    """The step's program replayed back to back with its inputs already on the device (one stage)."""
    run_steps = inst.device_replay(kind, segs)
    run_steps(2)
    reps = []
    for _ in range(3):
        t0 = time.perf_counter()
        run_steps(steps)
        reps.append((time.perf_counter() - t0) / steps)
    return 1e3 * min(reps)


def _kv_pages_that_fit(model: Model, reserve_gib: float) -> int:
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 16 << 30)
    free = limit - model.weight_bytes() - reserve_gib * 2**30
    return max(2, int(free // (16 * model.kv_bytes_per_token())))


# ---- decode ---------------------------------------------------------------------------------------


def decode_grid(model: Model, batches: list[int], contexts: list[int], read_tbps: float, copy_tbps: float, *,
                repeats: int = 10, attention: str = "auto") -> list[dict[str, Any]]:
    """Decode steps over a grid of batch sizes and contexts, each against its floor: the bytes the
    step must read (weights + KV) over the read-only streaming rate. A decode step writes almost
    nothing, so the copy rate (read + write bytes over time) understates what the memory can give
    it; that floor is kept beside as ``copy_floor_ms``."""
    contexts = sorted({min(c, model.cfg.max_position_embeddings - 1) for c in contexts})  # the new token's position
    max_ctx = max(contexts)
    max_len = min(model.cfg.max_position_embeddings, max_ctx + 16)
    want = max(b * math.ceil((c + 1) / 16) for b in batches for c in contexts) + 1
    num_pages = min(want, _kv_pages_that_fit(model, reserve_gib=4.0))
    inst = make_instance(model, "decode", num_pages, max_len, batch=max(batches), attention=attention)
    fill_pools(inst)
    rng = np.random.default_rng(0)
    rows = []
    for ctx in contexts:
        for B in batches:
            need = B * math.ceil((ctx + 1) / 16)
            row: dict[str, Any] = {"model": model.name, "batch": B, "context": ctx}
            if need > inst.alloc.num_free:
                gib = (need * 16 * model.kv_bytes_per_token() + model.weight_bytes()) / 2**30
                rows.append({**row, "skipped": f"needs {gib:.0f} GiB for weights + KV"})
                continue
            segs, rids = _segments(inst, B, ctx, rng, "decode")
            sync_ms = median_ms(lambda: inst.run("decode", [segs]), repeats)
            engine_ms = decode_step_ms(inst, segs, repeats)
            device_ms = _device_loop_ms(inst, "decode", segs)
            floor_bytes = model.weight_bytes() + B * (ctx + 1) * model.kv_bytes_per_token()
            floor_ms = floor_bytes / (read_tbps * 1e12) * 1e3
            copy_floor_ms = floor_bytes / (copy_tbps * 1e12) * 1e3
            rows.append({**row, "engine_ms": engine_ms, "sync_ms": sync_ms, "device_ms": device_ms, "floor_ms": floor_ms,
                         "floor_bytes": floor_bytes, "x_floor": engine_ms / floor_ms,
                         "copy_floor_ms": copy_floor_ms, "x_copy_floor": engine_ms / copy_floor_ms,
                         "host_share": max(0.0, 1 - device_ms / engine_ms),
                         "tokens_per_s": B / engine_ms * 1e3})
            _release(inst, rids)
    del inst
    gc.collect()
    return rows


def decode_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'model':<16}{'batch':>6}{'ctx':>6}{'sync ms':>9}{'engine ms':>11}{'device ms':>11}{'floor ms':>10}"
           f"{'x floor':>9}{'x copy':>8}{'host %':>8}{'tok/s':>9}"]
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['model']:<16}{r['batch']:>6}{r['context']:>6}  {r['skipped']}")
            continue
        out.append(f"{r['model']:<16}{r['batch']:>6}{r['context']:>6}{r.get('sync_ms', float('nan')):>9.2f}"
                   f"{r['engine_ms']:>11.2f}{r['device_ms']:>11.2f}"
                   f"{r['floor_ms']:>10.2f}{r['x_floor']:>9.2f}{r['x_copy_floor']:>8.2f}{100 * r['host_share']:>8.1f}"
                   f"{r['tokens_per_s']:>9.0f}")
    return out


# ---- sampling and log-probabilities ---------------------------------------------------------------


SAMPLED = dict(temperature=0.8, top_p=0.9)  # a typical chat request's sampling


def sampling_grid(model: Model, batches: list[int], ctx: int, *, repeats: int = 10,
                  attention: str = "auto") -> list[dict[str, Any]]:
    """What sampling and log-probabilities add to a decode step (the engine's step with the serving
    loop's lookahead): all rows greedy, one row sampled, every row sampled, and one row asking for
    5 log-probabilities, each at the same batch and context."""
    from distllm_jax.engine import SamplingParams

    max_len = min(model.cfg.max_position_embeddings, ctx + 16)
    want = max(batches) * math.ceil((ctx + 1) / 16) + 1
    inst = make_instance(model, "decode", min(want, _kv_pages_that_fit(model, reserve_gib=4.0)), max_len,
                         batch=max(batches), attention=attention)
    fill_pools(inst)
    rng = np.random.default_rng(0)
    flavours = {
        "greedy": lambda i: SamplingParams(max_tokens=1),
        "one_sampled": lambda i: SamplingParams(max_tokens=1, seed=i, **SAMPLED) if i == 0 else SamplingParams(max_tokens=1),
        "all_sampled": lambda i: SamplingParams(max_tokens=1, seed=i, **SAMPLED),
        "one_logprobs": lambda i: SamplingParams(max_tokens=1, logprobs=5) if i == 0 else SamplingParams(max_tokens=1),
    }
    rows = []
    for B in batches:
        if B * math.ceil((ctx + 1) / 16) > inst.alloc.num_free:
            rows.append({"model": model.name, "batch": B, "context": ctx, "skipped": "KV does not fit"})
            continue
        segs, rids = _segments(inst, B, ctx, rng, "decode")
        row: dict[str, Any] = {"model": model.name, "batch": B, "context": ctx}
        for name, params in flavours.items():
            these = [seg._replace(params=params(i)) for i, seg in enumerate(segs)]
            row[f"{name}_ms"] = decode_step_ms(inst, these, repeats)
        for name in ("one_sampled", "all_sampled", "one_logprobs"):
            row[f"{name}_x"] = row[f"{name}_ms"] / row["greedy_ms"]
        rows.append(row)
        _release(inst, rids)
    del inst
    gc.collect()
    return rows


def _ms_and_ratio(row: dict[str, Any], kind: str) -> str:
    return f"{row[kind + '_ms']:.2f} ({row[kind + '_x']:.2f}x)"


def sampling_table(rows: list[dict[str, Any]]) -> list[str]:
    kinds = ("one_sampled", "all_sampled", "one_logprobs")
    out = [f"{'model':<16}{'batch':>6}{'ctx':>6}{'greedy ms':>11}" + "".join(f"{k.replace('_', ' '):>20}" for k in kinds)]
    for r in rows:
        if "skipped" in r:
            out.append(f"{r['model']:<16}{r['batch']:>6}{r['context']:>6}  {r['skipped']}")
            continue
        cells = "".join(f"{_ms_and_ratio(r, k):>20}" for k in kinds)
        out.append(f"{r['model']:<16}{r['batch']:>6}{r['context']:>6}{r['greedy_ms']:>11.2f}{cells}")
    return out


# ---- start ---------------------------------------------------------------------------------------

_START = """
import collections, dataclasses, json, sys, time
t0 = time.perf_counter()
import jax
phases = collections.defaultdict(float)  # jax's own timers: tracing, lowering, compiling or loading
def _phase(name, secs, **_):
    phases[name] += secs
jax.monitoring.register_event_duration_secs_listener(_phase)
from distllm_jax import compile_cache
compile_cache.enable(sys.argv[1])
from distllm_jax.engine import DeviceRandomSource, Engine, EngineConfig, SamplingParams, compile_counter
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.presets import preset
cfg = ModelConfig.from_hf_dict(preset(sys.argv[2]))
ecfg = EngineConfig(**json.loads(sys.argv[3]))
t1 = time.perf_counter()
engine = Engine(DeviceRandomSource(cfg, ecfg.dtype, seed=0), ecfg)
t2 = time.perf_counter()
out = engine.submit([5, 6, 7], SamplingParams(max_tokens=4)).result()
engine.shutdown()
from distllm_jax.engine.executable_store import default_store
store = dataclasses.asdict(default_store().stats)
print("START " + json.dumps({"ready_s": t2 - t1, "process_s": t2 - t0, "warmup_s": engine.warmup_seconds,
                             "store": store,
                             "compilations": compile_counter.compilations(), "cache_hits": compile_counter.cache_hits(),
                             "tokens": len(out.token_ids), "token_ids": list(out.token_ids), "phases_s": dict(phases),
                             "slowest": sorted(engine.warmup_log.items(), key=lambda kv: -kv[1])[:8]}))
"""


def start_times(model: Model, cache_dir: Path, *, max_len: int = 2048, timeout: int = 600,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A cold start (empty compile cache) and then a warm one (the cache the cold start filled) of a
    colocated engine on this GPU, each in its own process, from ``Engine(...)`` to ready (weights
    drawn on the device, every program compiled or loaded), then one request served. Run before this
    process touches the GPU: jax here would hold the memory the starts need."""
    import shutil

    shutil.rmtree(cache_dir, ignore_errors=True)
    ecfg = dict(mode="colocated", max_seq_len=max_len, dtype=model.dtype, progress=False, **(overrides or {}))
    row: dict[str, Any] = {"model": model.name, "max_seq_len": max_len, "config": overrides or {}}
    for kind in ("cold", "warm"):
        proc = subprocess.run([sys.executable, "-c", _START, str(cache_dir), model.name, json.dumps(ecfg)],
                              capture_output=True, text=True, timeout=timeout)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("START ")), None)
        if line is None:
            raise RuntimeError(f"{kind} start failed: {(proc.stderr or proc.stdout)[-1500:]}")
        row[kind] = json.loads(line[6:])
    row["cold_start_s"], row["warm_start_s"] = row["cold"]["ready_s"], row["warm"]["ready_s"]
    row["same_tokens"] = row["cold"]["token_ids"] == row["warm"]["token_ids"]  # what a loaded program served
    return row


def start_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'model':<16}{'cold s':>8}{'warm s':>8}{'compiled cold':>15}{'compiled warm':>15}{'cache hits':>12}"
           f"{'stored':>8}{'loaded':>8}  same tokens"]
    for r in rows:
        out.append(f"{r['model']:<16}{r['cold_start_s']:>8.1f}{r['warm_start_s']:>8.1f}"
                   f"{r['cold']['compilations']:>15}{r['warm']['compilations']:>15}{r['warm']['cache_hits']:>12}"
                   f"{r['cold']['store']['saved']:>8}{r['warm']['store']['loaded']:>8}  {r['same_tokens']}")
    return out


# ---- prefill --------------------------------------------------------------------------------------


def prefill_grid(model: Model, token_counts: list[int], matmul_tflops: float, *, prompt_len: int = 2048,
                 repeats: int = 5, attention: str = "auto") -> list[dict[str, Any]]:
    top = max(token_counts)
    max_len = min(model.cfg.max_position_embeddings, prompt_len)
    inst = make_instance(model, "prefill", top // 16 + 16, max_len, budget=top, attention=attention)
    rng = np.random.default_rng(0)
    rows = []
    for T in token_counts:
        L = min(T, max_len)
        n = T // L
        segs, rids = _segments(inst, n, L, rng, "prefill")
        ms = median_ms(lambda: inst.run("prefill", [segs]), repeats)
        device_ms = _device_loop_ms(inst, "prefill", segs, steps=5)
        flops = model.prefill_flops([L] * n)
        rows.append({"model": model.name, "tokens": n * L, "prompts": n, "prompt_len": L, "engine_ms": ms,
                     "device_ms": device_ms, "tokens_per_s": n * L / ms * 1e3, "tflop": flops / 1e12,
                     "tflop_per_s": flops / (ms * 1e-3) / 1e12,
                     "mfu": flops / (ms * 1e-3) / (matmul_tflops * 1e12)})
        _release(inst, rids)
    del inst
    gc.collect()
    return rows


def prefill_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'model':<16}{'tokens':>7}{'prompts':>8}{'engine ms':>11}{'device ms':>11}{'tokens/s':>10}"
           f"{'TFLOP/s':>9}{'MFU %':>7}"]
    for r in rows:
        out.append(f"{r['model']:<16}{r['tokens']:>7}{r['prompts']:>8}{r['engine_ms']:>11.2f}{r['device_ms']:>11.2f}"
                   f"{r['tokens_per_s']:>10.0f}{r['tflop_per_s']:>9.0f}{100 * r['mfu']:>7.1f}")
    return out


# ---- trace ----------------------------------------------------------------------------------------


def _trace_events(log_dir: Path) -> tuple[list[dict], dict[int, str]]:
    files = sorted(log_dir.rglob("*.json.gz"))
    if not files:
        raise RuntimeError(f"the profiler wrote no trace under {log_dir}")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, names


def kernel_kind(name: str) -> str:
    """The part of a decode step a GPU kernel belongs to, from its name: the Pallas attention kernels,
    the matmuls (XLA's GEMM fusions, cuBLAS/cuBLASLt, CUTLASS), the KV write (scatters), or the rest
    (norms, residuals, biases, activations, sampling)."""
    n = name.lower()
    if "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "cublas", "cutlass", "xmma", "nvjet", "matmul")):
        return "matmul"
    if "scatter" in n:
        return "kv_write"
    return "other"


def summarize_trace(log_dir: Path, steps: int) -> dict[str, Any]:
    """Kernels on the GPU per step: how many, their summed time, and the biggest by name."""
    events, pnames = _trace_events(log_dir)
    gpu = {pid for pid, n in pnames.items() if "gpu" in n.lower() or "device" in n.lower()}
    kern = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and e.get("dur") is not None]
    by_name: dict[str, list[float]] = defaultdict(list)
    for e in kern:
        by_name[e["name"]].append(float(e["dur"]))
    busy = sum(float(e["dur"]) for e in kern)
    by_kind: dict[str, float] = defaultdict(float)
    for n, d in by_name.items():
        by_kind[kernel_kind(n)] += sum(d) / steps
    span = (max(e["ts"] + e["dur"] for e in kern) - min(e["ts"] for e in kern)) if kern else 0.0
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    host: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") not in gpu and e.get("dur") is not None:
            host[e["name"]].append(float(e["dur"]))
    host_top = sorted(host.items(), key=lambda kv: -sum(kv[1]))[:25]
    return {"host_top": [{"name": n[:90], "count_per_step": len(d) / steps, "us_per_step": sum(d) / steps}
                         for n, d in host_top],
            "processes": sorted(set(pnames.values())), "kernels_per_step": len(kern) / steps,
            "busy_us_per_step": busy / steps, "span_us_per_step": span / steps,
            "us_per_step_by_kind": dict(sorted(by_kind.items())),
            "top": [{"name": n[:90], "count_per_step": len(d) / steps, "us_per_step": sum(d) / steps}
                    for n, d in top]}


def trace_decode(model: Model, B: int, ctx: int, trace_dir: Path, steps: int = 10, attention: str = "auto") -> dict[str, Any]:
    ctx = min(ctx, model.cfg.max_position_embeddings - 1)  # the new token's position
    inst = make_instance(model, "decode", B * math.ceil((ctx + 1) / 16) + 2,
                         min(model.cfg.max_position_embeddings, ctx + 16), batch=max(B, 1), attention=attention)
    fill_pools(inst)
    segs, _ = _segments(inst, B, ctx, np.random.default_rng(0), "decode")
    for _ in range(3):
        inst.run("decode", [segs])
    log_dir = trace_dir / f"trace-{model.name}-b{B}-c{ctx}-{time.strftime('%H%M%S')}"
    jax.profiler.start_trace(str(log_dir), create_perfetto_trace=True)
    t0 = time.perf_counter()
    run_decode_steps(inst, segs, steps)  # as the serving loop runs them (lookahead)
    wall_us = (time.perf_counter() - t0) / steps * 1e6
    jax.profiler.stop_trace()
    summary = summarize_trace(log_dir, steps)
    hlo = _hlo_counts(inst, segs)
    del inst
    gc.collect()
    return {"model": model.name, "batch": B, "context": ctx, "wall_us_per_step": wall_us, **summary, "hlo": hlo}


def _hlo_counts(inst, segs) -> dict[str, int]:
    """What the compiled decode program launches: fusions, custom calls (Pallas, cuBLAS), copies,
    conditionals, and whether XLA wrapped kernels into command buffers (CUDA graphs)."""
    text = inst.compiled_text("decode", segs)
    entry = text[text.find("ENTRY"):]
    count = lambda needle, s=entry: s.count(needle)  # noqa: E731
    return {"entry_fusions": count(" fusion("), "entry_custom_calls": count(" custom-call("),
            "entry_copies": count(" copy("), "conditionals": text.count(" conditional("),
            "command_buffers": text.count("command_buffer"), "while_loops": text.count(" while(")}


def trace_table(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        out.append(f"{r['model']} decode b{r['batch']} ctx{r['context']}: wall {r['wall_us_per_step']:.0f} us/step, "
                   f"GPU busy {r['busy_us_per_step']:.0f} us, span {r['span_us_per_step']:.0f} us, "
                   f"{r['kernels_per_step']:.0f} kernels/step; HLO {r['hlo']}")
        out.append("  by kind: " + ", ".join(f"{k} {v:.0f} us" for k, v in r["us_per_step_by_kind"].items()))
        for t in r["top"][:10]:
            out.append(f"    {t['us_per_step']:>8.1f} us {t['count_per_step']:>6.1f}x  {t['name']}")
        out.append("  host:")
        for t in r.get("host_top", [])[:25]:
            out.append(f"    {t['us_per_step']:>8.1f} us {t['count_per_step']:>6.1f}x  {t['name']}")
    return out


# ---- the decode kernel alone -------------------------------------------------------------------


def kernel_grid(model: Model, batches: list[int], contexts: list[int], read_tbps: float, *,
                reps: int = 30) -> list[dict[str, Any]]:
    """The paged decode kernel as the engine calls it (its own defaults), on this model's head layout,
    against the read-only rate measured in the same process; jax's Pallas ``paged_attention`` beside it
    (on the GPU). Contexts are rounded down to whole pages. ``reps``: calls dispatched back to back per
    timing, the same for every kernel; a kernel of tens of microseconds needs tens of them, or the
    launch latency is what gets timed."""
    from bench.kernels import decode_suite

    cfg = model.cfg
    gpu = jax.default_backend() == "gpu"
    rows = decode_suite(batches, [c // 16 * 16 for c in contexts], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        dtype=jnp.dtype(model.dtype), configs=None, interpret=not gpu, reps=reps)
    return [{"model": model.name, "batch": r["batch"], "ctx": r["context"], "kv_heads": r["kv_heads"],
             "q_heads": r["q_heads"], "TBps": r["ours_TBps"], "read_share": r["ours_TBps"] / read_tbps,
             "ms": r["ours_ms"], "head_major_TBps": r["head_major_TBps"], "upstream_TBps": r.get("upstream_TBps"),
             "xla_TBps": r["xla_TBps"]} for r in rows]


def kernel_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'model':<16}{'batch':>6}{'ctx':>6}{'kv heads':>9}{'ms':>8}{'TB/s':>7}{'of read':>8}{'head-major':>11}"
           f"{'upstream':>9}"]
    for r in rows:
        up = r["upstream_TBps"]
        out.append(f"{r['model']:<16}{r['batch']:>6}{r['ctx']:>6}{r['kv_heads']:>9}{r['ms']:>8.3f}{r['TBps']:>7.2f}"
                   f"{r['read_share']:>8.0%}{r['head_major_TBps']:>11.2f}{'-' if up is None else f'{up:.2f}':>9}")
    return out


def floor_report(info: dict[str, Any], ceil: dict[str, Any], results: dict[str, list]) -> dict[str, Any]:
    """One file for the decode floor, the kernel, sampling and starts, from one suite call: the rows of
    each part renamed to the report's fields (``ctx``, ``step_ms``, ``read_floor_ms``, ...)."""
    decode = [{"model": r["model"], "batch": r["batch"], "ctx": r["context"], "step_ms": r["engine_ms"],
               "device_ms": r["device_ms"], "read_floor_ms": r["floor_ms"], "copy_floor_ms": r["copy_floor_ms"],
               "x_read_floor": r["x_floor"], "x_copy_floor": r["x_copy_floor"]}
              for r in results.get("decode", []) if "engine_ms" in r]
    sampling = [{"model": r["model"], "batch": r["batch"], "ctx": r["context"], "greedy_ms": r["greedy_ms"],
                 "one_sampled_ms": r["one_sampled_ms"], "all_sampled_ms": r["all_sampled_ms"],
                 "one_sampled_x": r["one_sampled_x"], "all_sampled_x": r["all_sampled_x"]}
                for r in results.get("sampling", []) if "greedy_ms" in r]
    starts = results.get("start", [])
    return {**info, "ceilings": {k: ceil[k] for k in ("read_tb_per_s", "copy_tb_per_s", "matmul_tflop_per_s")},
            "decode": decode, "kernel": [r for r in results.get("kernel", []) if "TBps" in r], "sampling": sampling,
            "prefill": [r for r in results.get("prefill", []) if "mfu" in r],
            "warm_start_s": {r["model"]: r["warm_start_s"] for r in starts},
            "cold_start_s": {r["model"]: r["cold_start_s"] for r in starts}}


# ---- end to end, and transformers side by side ---------------------------------------------------


def engine_e2e(model: Model, batch: int, prompt_len: int, new_tokens: int, budget: int = 2048) -> dict[str, Any]:
    """The engine (colocated, one GPU) generating one batch offline: output tokens/s, and how many
    programs compiled after warm-up (must be 0). ``budget``: the prefill token budget (at least one
    prompt); the engine compiles a prefill program for every power of two up to it."""
    from distllm_jax.engine import DeviceRandomSource, Engine, EngineConfig, InstanceSpec, SamplingParams
    from distllm_jax.engine import compile_counter

    max_len = min(model.cfg.max_position_embeddings, prompt_len + new_tokens + 16)
    pages = batch * math.ceil(max_len / 16) + 8
    ecfg = EngineConfig(mode="colocated", colocated=(InstanceSpec(1, num_pages=pages),), num_pages=pages,
                        max_seq_len=max_len, prefill_token_budget=max(budget, prompt_len), max_prefill_seqs=16,
                        max_decode_batch=batch, dtype=model.dtype, progress=False)
    t0 = time.perf_counter()
    eng = Engine(DeviceRandomSource(model.cfg, model.dtype), ecfg, devices=jax.devices()[:1])
    start_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 1000, prompt_len).tolist() for _ in range(batch)]
    sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    eng.generate_all(prompts[:2], sp)  # first requests through every path
    before = compile_counter.compilations()
    t0 = time.perf_counter()
    outs = eng.generate_all(prompts, sp)
    wall = time.perf_counter() - t0
    new_compiles = compile_counter.compilations() - before
    tokens = sum(o.num_output_tokens for o in outs)
    tpot = statistics.median((o.timings.token_times[-1] - o.timings.first_token) / max(1, len(o.timings.token_times) - 1)
                             for o in outs)
    eng.shutdown(drain=False)
    del eng
    gc.collect()
    return {"system": "distllm_jax (colocated)", "model": model.name, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "seconds": wall, "output_tokens": tokens, "tokens_per_s": tokens / wall,
            "median_tpot_ms": 1e3 * tpot, "compilations_after_warmup": new_compiles, "startup_s": start_s,
            "prefill_token_budget": ecfg.prefill_token_budget}


HF_SCRIPT = r"""
import json, sys, time, torch, transformers
from distllm_jax.models.presets import preset
name, batch, prompt_len, new, cache = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
hf = preset(name)
cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **{k: v for k, v in hf.items() if k != "architectures"})
torch.manual_seed(0)
with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
ids = torch.randint(3, 1000, (batch, prompt_len), device="cuda")
kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
if cache != "dynamic":
    kw["cache_implementation"] = cache
with torch.inference_mode():
    model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
    torch.cuda.synchronize()
    t0 = time.perf_counter(); out = model.generate(ids, **kw); torch.cuda.synchronize(); wall = time.perf_counter() - t0
n = (out.shape[1] - prompt_len) * batch
print("RESULT " + json.dumps({"system": f"transformers {transformers.__version__} ({cache} cache)", "model": name,
      "batch": batch, "prompt_len": prompt_len, "new_tokens": new, "seconds": wall, "output_tokens": n,
      "tokens_per_s": n / wall, "torch": torch.__version__}))
"""


def hf_generate(model: Model, batch: int, prompt_len: int, new_tokens: int, cache: str, timeout: int) -> dict[str, Any]:
    cmd = [sys.executable, "-c", HF_SCRIPT, model.name, str(batch), str(prompt_len), str(new_tokens), cache]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"system": f"transformers ({cache} cache)", "model": model.name, "error": f"over {timeout}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"system": f"transformers ({cache} cache)", "model": model.name,
            "error": (p.stderr or p.stdout)[-1500:]}


def e2e_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [f"{'system':<44}{'model':<16}{'batch':>6}{'in':>6}{'out':>6}{'seconds':>9}{'tok/s':>9}  notes"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['system']:<44}{r['model']:<16}  error: {r['error'].splitlines()[-1][:80] if r['error'] else ''}")
            continue
        note = (f"compiles after warm-up {r['compilations_after_warmup']}, median TPOT {r['median_tpot_ms']:.1f} ms"
                if "compilations_after_warmup" in r else "")
        out.append(f"{r['system']:<44}{r['model']:<16}{r['batch']:>6}{r['prompt_len']:>6}{r['new_tokens']:>6}"
                   f"{r['seconds']:>9.2f}{r['tokens_per_s']:>9.0f}  {note}")
    return out


# ---- the placement's latency profile ---------------------------------------------------------------


def engine_profile(model: Model, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """``distllm profile`` of this model on this GPU (tensor degree 1): the engine's prefill and
    decode programs over a grid, the latency model fitted, the profile JSON written beside the rest."""
    from distllm_jax.engine import DeviceRandomSource
    from distllm_jax.placement.profiler import profile

    spec = {k: _ints(v) for k, v in (kv.split("=") for kv in args.profile_grid.split(";"))}
    src = DeviceRandomSource(model.cfg, model.dtype, seed=0)
    prof, errors = profile(src, [1], spec["prompt_lens"], spec["prompts"], spec["batches"], spec["contexts"],
                           repeats=3, name=model.name)
    d = prof.to_dict()
    d["fit_errors"] = errors
    path = out_dir / f"profile-{device_tag()}-{model.name}.json"
    path.write_text(json.dumps(d, indent=1))
    e = errors[1]
    return {"model": model.name, "profile": str(path), "prefill_mean_rel_err": e["prefill_mean_rel_err"],
            "decode_mean_rel_err": e["decode_mean_rel_err"], "fit": d["fits"]}


def profile_table(rows: list[dict[str, Any]]) -> list[str]:
    return [f"profile {r['model']}: prefill fit mean |err| {100 * r['prefill_mean_rel_err']:.1f}%, decode "
            f"{100 * r['decode_mean_rel_err']:.1f}% -> {r['profile']}" for r in rows]


# ---- driver ---------------------------------------------------------------------------------------


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def run_part(part: str, model: Model, args: argparse.Namespace, ceil: dict[str, Any], parts: list[str],
             results: dict[str, list], out_dir: Path) -> None:
    if part == "decode":
        rows = decode_grid(model, _ints(args.batches), _ints(args.contexts), ceil["read_tb_per_s"], ceil["copy_tb_per_s"],
                           repeats=args.repeats, attention=args.attention)
        _emit(decode_table(rows))
    elif part == "sampling":
        rows = sampling_grid(model, _ints(args.sampling_batches), args.sampling_context, repeats=args.repeats,
                             attention=args.attention)
        _emit(sampling_table(rows))
    elif part == "kernel":
        rows = kernel_grid(model, _ints(args.batches), _ints(args.contexts), ceil["read_tb_per_s"], reps=args.kernel_reps)
        _emit(kernel_table(rows))
    elif part == "prefill":
        rows = prefill_grid(model, _ints(args.prefill_tokens), ceil["matmul_tflop_per_s"], attention=args.attention)
        _emit(prefill_table(rows))
    elif part == "trace":
        rows = []
        for pair in args.trace.split(","):
            B, ctx = (int(x) for x in pair.split(":"))
            rows.append(trace_decode(model, B, ctx, Path(args.trace_dir), attention=args.attention))
            _emit(trace_table(rows[-1:]))
    elif part == "profile":
        rows = [engine_profile(model, args, out_dir)]
        _emit(profile_table(rows))
    else:
        B, P, N = (int(x) for x in args.e2e.split(":"))
        rows = [engine_e2e(model, B, P, N, args.e2e_budget)] if "e2e" in parts else []
        rows += args.hf_rows.get(model.name, [])
        _emit(e2e_table(rows))
    results[part] += rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="ceilings,decode,prefill")
    p.add_argument("--models", default="opt-1.3b,opt-6.7b,opt-13b,llama-3-8b")
    p.add_argument("--batches", default="1,8,32,64,128,256")
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--prefill-tokens", default="512,2048,8192")
    p.add_argument("--sampling-batches", default="32,128", help="batches of the sampling part")
    p.add_argument("--sampling-context", type=int, default=512, help="context of the sampling part")
    p.add_argument("--start-cache", default="/tmp/distllm-start-cache",
                   help="compile cache the start part fills (emptied first: its first start is cold)")
    p.add_argument("--start-max-len", type=int, default=2048, help="max_seq_len of the engine the start part starts")
    p.add_argument("--start-config", default="{}", help="EngineConfig fields (JSON) for that engine, beside the defaults")
    p.add_argument("--trace", default="1:512,64:2048", help="batch:context pairs traced by the trace part")
    p.add_argument("--e2e", default="32:512:128", help="batch:prompt:new tokens for the e2e and hf parts")
    p.add_argument("--e2e-budget", type=int, default=2048, help="the e2e part's prefill token budget")
    p.add_argument("--profile-grid", default="prompt_lens=128,512,1024,2048;prompts=1,2,4;batches=1,8,32,64;"
                   "contexts=128,512,1536", help="the profile part's grid (distllm profile's axes)")
    p.add_argument("--hf-caches", default="dynamic,static")
    p.add_argument("--hf-timeout", type=int, default=300)
    p.add_argument("--trace-dir", default="/tmp/distllm-traces", help="where the profiler's raw traces go")
    p.add_argument("--attention", default="auto")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--kernel-reps", type=int, default=30, help="kernel part: calls back to back per timing")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--floor-out", default=None,
                   help="also write the decode, kernel, sampling, prefill and start rows of this call to one file")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    args.hf_rows = {}
    if "hf" in parts:  # first, while this process holds no GPU memory (jax takes most of it once it starts)
        B, P, N = (int(x) for x in args.e2e.split(":"))
        for name in args.models.split(","):
            args.hf_rows[name] = [hf_generate(load_model(name), B, P, N, c, args.hf_timeout)
                                  for c in args.hf_caches.split(",")]
    results: dict[str, list] = defaultdict(list)
    if "start" in parts:  # first too: each start is a process of its own that needs the GPU's memory
        for name in args.models.split(","):
            results["start"].append(start_times(load_model(name), Path(args.start_cache) / name,
                                                max_len=args.start_max_len, overrides=json.loads(args.start_config)))
            _emit(start_table(results["start"][-1:]))
            (out / f"gpu-suite-start-{name}.json").write_text(json.dumps({"rows": results["start"]}, indent=1))
    tag = device_tag()
    info = device_info()
    print(json.dumps(info), flush=True)
    ceil_path = out / f"ceilings-{tag}.json"
    if "ceilings" in parts or not ceil_path.exists():
        ceil = ceilings()
        ceil_path.write_text(json.dumps({**info, **ceil}, indent=1))
    else:
        ceil = json.loads(ceil_path.read_text())

    def save() -> None:  # after every part: a call cut short at its time limit keeps what it measured
        for part, rows in results.items():
            path = out / f"gpu-suite-{part}-{tag}-{'_'.join(args.models.split(','))}.json"
            path.write_text(json.dumps({**info, "ceilings": ceil, "rows": rows}, indent=1))
        if args.floor_out:
            Path(args.floor_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.floor_out).write_text(json.dumps(floor_report(info, ceil, results), indent=1))

    for name in args.models.split(","):
        model = load_model(name)
        for part in ("decode", "kernel", "sampling", "prefill", "trace", "profile", "e2e"):
            if part in parts or (part == "e2e" and "hf" in parts):
                try:
                    run_part(part, model, args, ceil, parts, results, out)
                except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others
                    import traceback

                    traceback.print_exc()
                    _emit([f"{model.name} {part}: FAILED {type(e).__name__}: {str(e)[:300]}"])
                    results[part].append({"model": model.name, "error": f"{type(e).__name__}: {e}"[:2000]})
                gc.collect()
                save()
    for part in results:
        print(f"wrote {out / f'gpu-suite-{part}-{tag}-' }{'_'.join(args.models.split(','))}.json")
    if args.floor_out:
        save()
        print(f"wrote {args.floor_out}")
    print("\n==== summary ====\n" + "\n\n".join(TABLES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
