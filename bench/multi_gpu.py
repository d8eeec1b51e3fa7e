"""Disaggregated vs colocated on one multi-device node (the paper's Figures 8 and 10, issue 10).

Parts (``--part``, a comma list, or ``all``):

- ``plan``: Algorithm 1 (``distllm_jax.placement.search``) over the latency profile for this node
  (gpus-per-node = ``--devices``, one node, KV moved at the device-to-device copy bandwidth measured in
  the same call) gives each prefill and decode degree's goodput; the disaggregated layout is the
  combination of prefill and decode instances filling the node with the highest simulated goodput.
  The colocated and chunked layouts are the best tensor degree (``colocated_search``) replicated to
  fill the node. Writes ``plan-<tag>-<model>.json`` (the disaggregated plan, as ``distllm serve
  --plan`` reads it); the colocated and chunked plans are kept in the results JSON.
- ``sweep``: for each mode start ``distllm serve --plan`` once, replay ShareGPT at every per-GPU rate
  in ``--rates`` (x the devices the layout uses), then stop it: SLO attainment vs per-GPU rate,
  per-GPU goodput (highest rate with >= 90% attainment, interpolated between measured rates), and the
  ratio of the disaggregated goodput to the best colocated one (Figure 8's shape). PNG:
  ``attainment-<tag>-<model>.png`` (measured, and simulated when ``simcheck`` ran).
- ``breakdown``: from the disaggregated run at each rate: the share of each request's latency spent
  queueing, in prefill, in KV migration and in decode (see ``bench.breakdown``), the CDF of migration
  time, and the migration bandwidth (prompt tokens x 2 x layers x kv heads x head dim x dtype bytes /
  migration time) against a ``jax.device_put`` copy from device 0 to device 1 timed in the same call
  (on virtual CPU devices that copy is a host memcpy). PNG: ``breakdown-<tag>-<model>.png``.
- ``simcheck``: the simulator fed with the profile, the same layouts, engine limits, request lengths
  and arrival times as each measured run: simulated vs measured attainment and median TTFT/TPOT.

Everything goes to ``<out>/multi-gpu-<tag>-<model>.json`` (``<tag>`` = device kind x count, e.g.
``h200x8``, ``cpux8``); a part reads the sections earlier parts left there, so parts can run in
separate calls against the same ``--out``. At most 5 files are written to ``--out``: that JSON, the
profile (with ``--profile-now``), the plan, two PNGs. The probe and the profile run in child
processes, so this process never holds device memory while the servers run.

On this machine (8 virtual CPU devices, tiny random model; the committed CPU result)::

    python -m bench.multi_gpu --part all --model tiny-opt --devices 8 --profile-now --rates 1,2,4,8 \\
        --num-prompts 40 --slo 0.1,0.01 --max-seq-len 256 --quiet --out bench/results/multi-gpu-cpu

On a node of 8 GPUs, OPT-13B-shaped random weights (bf16, drawn on the GPUs), the paper's chatbot SLO
(0.25 s, 0.1 s); the parts can also run one at a time against the same ``--out``::

    python3 -m bench.multi_gpu --part all --profile-now --model opt-13b --devices 8 --rates 0.5,1,1.5,2,3 \\
        --num-prompts 200 --max-seq-len 2048 --num-pages 2048 --max-decode-batch 64 --server-timeout 480 \\
        --out bench/results/multi-gpu-h200x8

(2048 pages of 16 tokens is 27 GB of OPT-13B KV per instance, which fits next to the 26 GB of weights at
tp1 on an 80 GB card.) ``--model llama-3-8b`` for LLaMA-3-8B's shapes (the SLO defaults to OPT-13B's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import breakdown as bd
from distllm_jax.placement.plan import Plan, PlanInstance

MODES = ("disaggregated", "colocated", "chunked")
PARTS = ("plan", "sweep", "breakdown", "simcheck")
TABLES: list[str] = []  # every part's table, printed again at the end


def _emit(lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text, flush=True)
    TABLES.append(text)


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(type(x))


def _finite(x):
    return None if x is None or not math.isfinite(x) else x


# ---- child processes: the device probe (copy bandwidth) and the profiler ---------------------------


def _child_env(devices: int | None) -> dict:
    root = str(Path(__file__).resolve().parents[1])  # this checkout, before any installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # CPU only; ignored by GPU platforms
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(8, devices or 0)}".strip()
    return env


def _child(args: argparse.Namespace, part: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "bench.multi_gpu", "--part", part, "--model", args.model, *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=_child_env(args.devices))
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
        else:
            print(f"[{part}] {line}", flush=True)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"the {part} child process failed (exit {proc.returncode})")
    return result


def _probe_main(args: argparse.Namespace) -> int:
    """Device kind and count, and the device-to-device copy bandwidth (device 0 -> device 1)."""
    import jax
    import jax.numpy as jnp

    devs = jax.devices()
    out: dict[str, Any] = {"backend": jax.default_backend(), "device_kind": devs[0].device_kind,
                           "count": len(devs), "jax": jax.__version__, "python": sys.version.split()[0]}
    if len(devs) >= 2:
        mib = args.copy_mib or (1024 if out["backend"] == "gpu" else 256)
        n = mib * 2**20 // 4
        x = jax.device_put(jnp.arange(n, dtype=jnp.float32), devs[0]).block_until_ready()
        times = []
        for i in range(6):
            t0 = time.perf_counter()
            y = jax.device_put(x, devs[1]).block_until_ready()
            if i:  # the first copy warms the path up
                times.append(time.perf_counter() - t0)
            y.delete()
        t = statistics.median(times)
        out["copy"] = {"bytes": 4 * n, "seconds_median": t, "gbps": 4 * n / t / 1e9,
                       "gbps_best": 4 * n / min(times) / 1e9, "from": str(devs[0]), "to": str(devs[1]),
                       "note": ("host memcpy between virtual CPU devices" if out["backend"] == "cpu"
                                else "jax.device_put between two GPUs")}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


GRID_KEYS = {"prompt_lens": "prompt_lens", "prompts": "prompts_per_batch", "batches": "batches",
             "contexts": "contexts", "repeats": "repeats"}  # --profile-grid's keys: profile()'s arguments


def profile_grid(backend: str, spec: str | None = None) -> dict:
    """The profiler's grid for this backend, with the axes ``spec`` names replaced (``--profile-grid``:
    ``prompt_lens=16,64;prompts=1,2;batches=1,4;contexts=32,128;repeats=3``, any of them)."""
    if backend == "gpu":  # fits OPT-13B at tp1 on an 80 GB card: 64 x 33 pages of KV at context 512
        grid = dict(prompt_lens=[128, 512, 1024], prompts_per_batch=[1, 2, 4], batches=[1, 8, 32, 64],
                    contexts=[128, 512], repeats=5)
    else:
        grid = dict(prompt_lens=[16, 64, 128], prompts_per_batch=[1, 2, 4], batches=[1, 4, 8, 16],
                    contexts=[32, 128], repeats=3)
    for item in (spec or "").split(";"):
        if not item.strip():
            continue
        key, _, values = item.partition("=")
        if key.strip() not in GRID_KEYS:
            raise ValueError(f"--profile-grid {item!r}: the keys are {', '.join(GRID_KEYS)}")
        ints = [int(v) for v in values.split(",")]
        grid[GRID_KEYS[key.strip()]] = ints[0] if key.strip() == "repeats" else ints
    return grid


def _profile_main(args: argparse.Namespace) -> int:
    import jax

    from distllm_jax.engine import DeviceRandomSource, RandomSource
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset
    from distllm_jax.placement.profiler import profile

    backend = jax.default_backend()
    dtype = args.dtype or ("bfloat16" if backend == "gpu" else "float32")
    cfg = ModelConfig.from_hf_dict(preset(args.model))
    source = (DeviceRandomSource if backend == "gpu" else RandomSource)(cfg, dtype, 0)
    tps = [int(t) for t in args.profile_tps.split(",")]
    t0 = time.perf_counter()
    grid = profile_grid(backend, args.profile_grid)
    prof, errors = profile(source, tps, page_size=args.page_size, name=args.model, **grid)
    out = prof.to_dict()
    out["grid"] = grid
    out["fit_errors"] = {k: {kk: vv for kk, vv in v.items() if "err" in kk} for k, v in errors.items()}
    out["profile_seconds"] = time.perf_counter() - t0
    Path(args.profile).write_text(json.dumps(out, indent=1))
    print("RESULT " + json.dumps({"path": args.profile, "seconds": out["profile_seconds"],
                                  "fit_errors": out["fit_errors"]}), flush=True)
    return 0


# ---- the run's state (one JSON in --out) ----------------------------------------------------------


class State:
    def __init__(self, args: argparse.Namespace, probe: dict):
        self.args, self.probe = args, probe
        kind = probe["device_kind"].lower()
        kind = "cpu" if probe["backend"] == "cpu" else (re.findall(r"[a-z]\d{2,4}", kind) or [kind])[-1]
        self.tag = f"{re.sub(r'[^a-z0-9]+', '', kind)}x{args.devices}"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / f"multi-gpu-{self.tag}-{args.model}.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("probes", []).append(probe)
        self.data.update(model=args.model, devices=args.devices, tag=self.tag, slo=list(args.slo_pair),
                         rates_per_gpu=args.rates, num_prompts=args.num_prompts, dataset=args.dataset,
                         engine_args=engine_args(args), device=probe["device_kind"], backend=probe["backend"])

    def file(self, stem: str, ext: str) -> Path:
        return self.out / f"{stem}-{self.tag}-{self.args.model}.{ext}"

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=_json_default))

    @property
    def copy_gbps(self) -> float | None:
        c = self.probe.get("copy")
        return c["gbps"] if c else None


def engine_args(args: argparse.Namespace) -> dict:
    return {"page_size": args.page_size, "num_pages": args.num_pages, "max_decode_batch": args.max_decode_batch,
            "prefill_token_budget": args.prefill_token_budget, "max_seq_len": args.max_seq_len,
            "max_prefill_seqs": 16}  # EngineConfig's default (serve has no flag for it)


def _dtype_bytes(state: State) -> int:
    dt = state.args.dtype or ("bfloat16" if state.probe["backend"] == "gpu" else "float32")
    return {"bfloat16": 2, "float16": 2, "float32": 4}[dt]


def _model_cfg(model: str):
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset

    return ModelConfig.from_hf_dict(preset(model))


def _max_len(args: argparse.Namespace) -> int:
    """The context the server will have (serve: min(512, positions) for a preset without --max-seq-len)."""
    pos = _model_cfg(args.model).max_position_embeddings
    return args.max_seq_len or min(512, pos)


def _lengths(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(prompt, output) lengths of the workload, tokenised as the served preset does (GPT-2 BPE)."""
    from distllm_jax.workload.datasets import load
    from distllm_jax.tokenizer import bundled_gpt2

    tok = bundled_gpt2()
    w = load(args.dataset, lambda s: tok.encode(s).ids, max(args.num_prompts, 200), _max_len(args), args.seed,
             tokenizer_id="gpt2-bpe")
    return [(i.prompt_len, i.output_len) for i in w.items]


def _profile(state: State):
    from distllm_jax.placement.latency import load_profile

    name = state.data.get("profile_path") or state.args.profile
    if not name:
        raise ValueError("no profile: pass --profile (a JSON from `distllm profile` on this device kind) or "
                         "--profile-now")
    p = Path(name)
    if not p.exists() and (state.out / p.name).exists():  # a relative path from an earlier call's --out
        p = state.out / p.name
    return load_profile(str(p) if p.exists() else name)


def sim_kwargs(args: argparse.Namespace, copy_gbps: float | None, max_len: int) -> dict:
    """The simulator's view of the engine's limits and of its padded step shapes (the ones the
    server's ``Instance`` compiles for these flags)."""
    from distllm_jax.shapes import compiled_shapes

    shapes = compiled_shapes(prefill_token_budget=args.prefill_token_budget, max_decode_batch=args.max_decode_batch,
                             max_len=max_len)
    kw = dict(prefill_token_budget=args.prefill_token_budget, max_decode_batch=args.max_decode_batch,
              max_prefill_seqs=16, kv_tokens=(args.num_pages - 1) * args.page_size, **shapes.sim_fields())
    if copy_gbps:
        kw["transfer_gbps"] = copy_gbps
    return kw


# ---- plan -----------------------------------------------------------------------------------------


def _par(label: str):
    """The plan instance of one of the search's ``detail`` labels, e.g. ``tp2pp1``."""
    m = re.fullmatch(r"tp(\d+)pp(\d+)", label)
    return PlanInstance(int(m.group(1)), int(m.group(2)))


def fill_disaggregated(per_config: dict, n_devices: int) -> dict | None:
    """Prefill and decode instances filling at most ``n_devices``: the counts and degrees whose
    min(prefill goodput, decode goodput) is highest (fewest devices on a tie)."""
    best = None
    for lp, vp in per_config.items():
        for ld, vd in per_config.items():
            p, d = _par(lp), _par(ld)
            gp, gd = vp["prefill_goodput"], vd["decode_goodput"]
            if gp <= 0 or gd <= 0:
                continue
            for n in range(1, n_devices // p.gpus + 1):
                m = (n_devices - n * p.gpus) // d.gpus
                if m < 1:
                    break
                for mm in range(1, m + 1):
                    good, gpus = min(n * gp, mm * gd), n * p.gpus + mm * d.gpus
                    key = (round(good, 9), -gpus)
                    if best is None or key > best[0]:
                        best = (key, dict(prefill=[p] * n, decode=[d] * mm, goodput=good, gpus=gpus))
    return best[1] if best else None


def part_plan(state: State) -> None:
    from distllm_jax.placement.search import Cluster, algorithm1, colocated_search, workload_from

    args = state.args
    prof = _profile(state)
    max_len = _max_len(args)
    wl = workload_from(_lengths(args), max(200, args.num_prompts), args.seed)
    kw = sim_kwargs(args, state.copy_gbps, max_len)
    node = Cluster(1, args.devices, intra_node_gbps=state.copy_gbps or 300.0)
    slo = args.slo_pair
    t0 = time.perf_counter()
    a1 = algorithm1(prof, wl, slo, node, 0.01, **kw)  # one of each: the per-degree goodputs
    fill = fill_disaggregated(a1.detail["per_config"], args.devices)
    if fill is None:
        raise ValueError("no prefill/decode pair fits the node and meets the SLO in the simulator")
    disagg = Plan("disaggregated", tuple(fill["prefill"]), tuple(fill["decode"]),
                  algorithm="algorithm1-high-affinity, filled to the node", expected_goodput=fill["goodput"],
                  detail={"algorithm1_best_units": {"prefill": a1.detail["prefill"], "decode": a1.detail["decode"]},
                          "per_config": a1.detail["per_config"]})
    plans = {"disaggregated": disagg}
    for mode in ("colocated", "chunked"):
        try:
            c = colocated_search(prof, wl, slo, node, 0.01, max_pp=1, mode=mode, **kw)
            per = c.detail["per_config"]
        except ValueError:
            per = {}
        fits = [(k, g) for k, g in per.items() if _par(k).gpus <= args.devices]
        if fits:
            k, g = max(fits, key=lambda kg: (kg[1] * (args.devices // _par(kg[0]).gpus), -_par(kg[0]).gpus))
            par = _par(k)
        else:  # nothing meets the SLO in the simulator: tp1 everywhere, still measured
            k, g, par = "tp1pp1", 0.0, _par("tp1pp1")
        count = args.devices // par.gpus
        plans[mode] = Plan(mode, colocated=(par,) * count,  # max_pp=1: pp 1
                           algorithm=f"colocated_search ({mode}), best tp replicated to the node",
                           expected_goodput=g * count, detail={"per_config": per})
    state.data["plan"] = {"profile": {"model": prof.model, "device": prof.device, "source": prof.source,
                                      "tps": sorted(prof.fits)},
                          "search_seconds": time.perf_counter() - t0, "transfer_gbps": kw.get("transfer_gbps"),
                          "plans": {mode: p.to_dict() for mode, p in plans.items()}}
    plan_file = state.file("plan", "json")
    disagg.save(plan_file)
    state.data["plan"]["file"] = plan_file.name
    lines = [f"plan: {args.model} on {args.devices} x {state.probe['device_kind']}, SLO {slo}, profile "
             f"{prof.device} (tp {sorted(prof.fits)}), search {state.data['plan']['search_seconds']:.1f}s",
             f"{'mode':<14}{'layout':<34}{'GPUs':>5}{'sim goodput':>13}{'per GPU':>9}"]
    for mode, p in plans.items():
        lay = _layout_label(p)
        lines.append(f"{mode:<14}{lay:<34}{p.gpus:>5}{p.expected_goodput:>13.3g}{p.per_gpu_goodput:>9.3g}")
    capped = sorted(k for k, v in a1.detail["per_config"].items() if max(v.values()) >= 64.0)
    if capped:  # search.config_goodput bisects up to 64 req/s: higher goodputs tie at the cap
        state.data["plan"]["capped_at_64"] = capped
        lines.append(f"note: the search's per-instance goodput is capped at 64 req/s ({', '.join(capped)} reached it); "
                     f"ties go to the fewest devices")
    lines.append(f"wrote {plan_file}")
    _emit(lines)


def _layout_label(plan: Plan) -> str:
    """``P 2x tp1 + D 1x tp2``."""

    def grp(xs):
        if not xs:
            return ""
        return f"{len(xs)}x tp{xs[0].tp}" + (f"pp{xs[0].pp}" if xs[0].pp > 1 else "")

    if plan.mode == "disaggregated":
        return f"P {grp(plan.prefill)} + D {grp(plan.decode)}"
    return grp(plan.colocated)


# ---- sweep ----------------------------------------------------------------------------------------


def _compact(r: dict) -> dict:
    """A request's record without its token times, seconds to the microsecond (keeps the JSON small)."""
    keep = ("index", "arrival", "prompt_len", "output_len", "output_tokens", "ttft", "tpot", "latency", "error",
            "finish_reason", "server")
    rnd = lambda v: round(v, 6) if isinstance(v, float) else v  # noqa: E731
    out = {k: rnd(r.get(k)) for k in keep}
    out["server"] = {k: rnd(v) for k, v in (r.get("server") or {}).items()}
    return out


def _idle_ttft(target, n: int = 8, prompt_len: int = 16) -> float:
    """Median client-side TTFT of a lone short request: the host + gRPC time the simulator lacks."""
    ts = []
    for _ in range(n):
        t0, first = time.perf_counter(), None
        for r in target.client.generate([5] * prompt_len, max_tokens=1, ignore_eos=True):
            if first is None and r.HasField("chunk") and r.chunk.token_ids:
                first = time.perf_counter() - t0
        ts.append(first if first is not None else math.nan)
    return statistics.median(ts)


def part_sweep(state: State) -> None:
    from distllm_jax.workload.slo import SLO

    args = state.args
    plans = state.data.get("plan", {}).get("plans")
    if not plans:
        raise ValueError("no plan: run --part plan first (with the same --out)")
    slo = SLO(*args.slo_pair)
    serve = ["--preset", args.model, "--page-size", str(args.page_size), "--num-pages", str(args.num_pages),
             "--max-decode-batch", str(args.max_decode_batch), "--prefill-token-budget", str(args.prefill_token_budget)]
    if args.max_seq_len:
        serve += ["--max-seq-len", str(args.max_seq_len)]
    if args.dtype:
        serve += ["--dtype", args.dtype]
    serve += args.serve_arg
    with tempfile.TemporaryDirectory(prefix="multi-gpu-plans-") as tmp:
        for mode in args.modes:
            _sweep_mode(state, mode, plans[mode], Path(tmp), serve, slo)
    _goodput_table(state)


def _sweep_mode(state: State, mode: str, plan: dict, tmp: Path, serve: list[str], slo) -> None:
    from bench.kick_the_tires import start_server, stop_server
    from bench.runs import Target, print_table, run_once

    args = state.args
    plan_path = state.file("plan", "json") if mode == "disaggregated" else tmp / f"{mode}.json"
    if mode != "disaggregated":
        Plan.from_dict(plan).save(plan_path)
    t0 = time.perf_counter()
    proc, address = start_server(mode, ["--plan", str(plan_path), *serve], timeout=args.server_timeout)
    ready = time.perf_counter() - t0
    runs = []
    try:
        target = Target(address)
        gpus = target.devices
        idle = _idle_ttft(target)
        for rate in args.rates:
            run = run_once(target, args.dataset, args.num_prompts, rate * gpus, slo, seed=args.seed,
                           progress=not args.quiet, results=None, cache_dir=args.cache_dir)
            s = run["summary"]
            print(f"{mode} {rate:g} req/s/GPU ({rate * gpus:g} req/s): attainment {100 * s['attainment']:.0f}%, "
                  f"errors {s['errors']}", flush=True)
            runs.append(run)
    finally:
        code = stop_server(proc)
    if code != 0:
        print(f"warning: the {mode} server exited with {code}", file=sys.stderr)
    print_table(runs)
    entry = {"gpus": gpus, "plan": plan, "engine": runs[0]["config"]["engine"], "server_ready_s": ready,
             "idle_ttft_s": idle, "server_exit": code, "copy": state.probe.get("copy"),
             "workload": runs[0]["config"]["workload"], "runs": []}
    for rate, run in zip(args.rates, runs):
        keep = ("requests", "completed", "errors", "duration_s", "request_throughput", "output_throughput",
                "attainment", "ttft_attainment", "tpot_attainment", "tightest_slo_scale")
        summ = {k: run["summary"].get(k) for k in keep}
        summ.update({k: v for k, v in run["summary"].items() if k.startswith(("p50_", "p90_", "mean_"))})
        entry["runs"].append({"per_gpu_rate": rate, "rate": rate * gpus, "summary": summ,
                              "requests": [_compact(r) for r in run["requests"]]})
    entry["goodput_per_gpu"] = bd.interpolated_goodput(args.rates, [r["summary"]["attainment"] for r in entry["runs"]])
    state.data.setdefault("sweep", {})[mode] = entry
    state.save()


def _goodput_table(state: State) -> None:
    sweep = state.data.get("sweep", {})
    if not sweep:
        return
    rates = sorted({r["per_gpu_rate"] for e in sweep.values() for r in e["runs"]})
    lines = [f"attainment (%) vs per-GPU rate, SLO TTFT {state.data['slo'][0]:g}s TPOT {state.data['slo'][1]:g}s, "
             f"{state.data['num_prompts']} prompts per rate",
             f"{'mode':<14}{'layout':<26}" + "".join(f"{r:>8g}" for r in rates) + f"{'goodput/GPU':>14}"]
    for mode in MODES:
        if mode not in sweep:
            continue
        e = sweep[mode]
        by = {r["per_gpu_rate"]: 100 * r["summary"]["attainment"] for r in e["runs"]}
        g = e["goodput_per_gpu"]
        gs = {"exact": f"{g['goodput']:.3g}", "lower": f">={g['goodput']:.3g}", "upper": f"<{g.get('below', 0):g}"}[g["bound"]]
        lines.append(f"{mode:<14}{_layout_label(Plan.from_dict(e['plan'])):<26}" + "".join(
            f"{by[r]:>8.0f}" if r in by else f"{'-':>8}" for r in rates) + f"{gs:>14}")
    ratios = {}
    if "disaggregated" in sweep:
        for base in ("colocated", "chunked"):
            if base in sweep:
                ratios[base] = bd.goodput_ratio(sweep["disaggregated"]["goodput_per_gpu"], sweep[base]["goodput_per_gpu"])
        base = [b for b in ("colocated", "chunked") if b in sweep]
        if base:
            best = max(base, key=lambda b: sweep[b]["goodput_per_gpu"]["goodput"])
            ratios["best_colocated"] = {"baseline": best, **ratios[best]}
    state.data["goodput_ratio"] = ratios
    for k, v in ratios.items():
        r = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        lines.append(f"disaggregated / {k}{' (' + v['baseline'] + ')' if 'baseline' in v else ''}: {r} ({v['note']})")
    _emit(lines)


# ---- breakdown ------------------------------------------------------------------------------------


def part_breakdown(state: State) -> None:
    e = state.data.get("sweep", {}).get("disaggregated")
    if not e:
        raise ValueError("no disaggregated sweep to break down: run --part sweep first")
    cfg = _model_cfg(state.args.model)
    bpt = bd.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, _dtype_bytes(state))
    c = e.get("copy") or state.probe.get("copy")  # measured in the call that ran the sweep
    out = {"kv_bytes_per_token": bpt, "copy": c, "per_rate": []}
    lines = [f"latency breakdown (disaggregated, share of summed request latency; KV {bpt} B/token)",
             f"{'rate/GPU':>9}{'reqs':>6}" + "".join(f"{p:>11}" for p in bd.PHASES)
             + f"{'mig p50 ms':>12}{'mig p99 ms':>12}{'mig GB/s':>10}"]
    for run in e["runs"]:
        recs = [r for r in run["requests"] if r.get("error") is None]
        b = bd.summarize_breakdown(r["server"] for r in recs)
        m = bd.migration_stats(recs, bpt)
        out["per_rate"].append({"per_gpu_rate": run["per_gpu_rate"], "breakdown": b, "migration": m})
        if b["requests"]:
            mig = (f"{1e3 * m['time_s']['p50']:>12.2f}{1e3 * m['time_s']['p99']:>12.2f}"
                   f"{m['bandwidth_gbps']['p50']:>10.3g}") if m["migrated"] else f"{'-':>12}{'-':>12}{'-':>10}"
            lines.append(f"{run['per_gpu_rate']:>9g}{b['requests']:>6}"
                         + "".join(f"{100 * b['share_of_total'][p]:>10.1f}%" for p in bd.PHASES) + mig)
    if c:
        lines.append(f"device-to-device copy ({c['from']} -> {c['to']}, {c['bytes'] / 2**20:.0f} MiB, {c['note']}): "
                     f"{c['gbps']:.3g} GB/s median, {c['gbps_best']:.3g} best")
        for row in out["per_rate"]:
            if row["migration"].get("migrated"):
                row["migration"]["p50_bandwidth_over_copy"] = row["migration"]["bandwidth_gbps"]["p50"] / c["gbps"]
    state.data["breakdown"] = out
    _emit(lines)


# ---- simulator check ------------------------------------------------------------------------------


def part_simcheck(state: State) -> None:
    from distllm_jax.placement.simulator import simulate

    args = state.args
    prof = _profile(state)
    slo = args.slo_pair
    max_len = _max_len(args)
    out: dict[str, Any] = {}
    lines = [f"simulator ({prof.device}) vs measured, attainment % and median TTFT / TPOT ms",
             f"{'mode':<14}{'rate/GPU':>9}{'att meas':>9}{'att sim':>9}{'TTFT meas':>11}{'TTFT sim':>10}"
             f"{'TPOT meas':>11}{'TPOT sim':>10}"]
    for mode, e in state.data.get("sweep", {}).items():
        plan = Plan.from_dict(e["plan"])
        tp0 = plan.instances()[0][1].tp  # the first prefill (or colocated) instance's
        # the host's admission + gRPC time: an idle request's TTFT minus the modelled prefill of its 16 tokens
        admission = max(0.0, e["idle_ttft_s"] - prof.fit(tp0).prefill_ms([16]) / 1e3)
        copy = e.get("copy") or state.probe.get("copy")  # the bandwidth of the call that measured it
        cfg = plan.to_sim_config(admission_s=admission, **sim_kwargs(args, copy["gbps"] if copy else None, max_len))
        rows = []
        for run in e["runs"]:
            recs = run["requests"]
            sim = simulate(prof, cfg, [(r["prompt_len"], r["output_len"]) for r in recs], [r["arrival"] for r in recs])
            meas_ok = [(r["ttft"], r["tpot"]) for r in recs if r.get("error") is None and r["ttft"] is not None]
            row = {"per_gpu_rate": run["per_gpu_rate"], "measured_attainment": run["summary"]["attainment"],
                   "sim_attainment": sum(1 for s in sim if s.ttft <= slo[0] and s.tpot <= slo[1]) / len(sim),
                   "measured_p50_ttft": statistics.median(t for t, _ in meas_ok) if meas_ok else None,
                   "measured_p50_tpot": statistics.median(t for _, t in meas_ok) if meas_ok else None,
                   "sim_p50_ttft": _finite(statistics.median(s.ttft for s in sim)),
                   "sim_p50_tpot": _finite(statistics.median(s.tpot for s in sim))}
            row["attainment_diff_points"] = 100 * (row["sim_attainment"] - row["measured_attainment"])
            rows.append(row)
            f = lambda x: f"{1e3 * x:.1f}" if x is not None else "-"  # noqa: E731
            lines.append(f"{mode:<14}{row['per_gpu_rate']:>9g}{100 * row['measured_attainment']:>9.0f}"
                         f"{100 * row['sim_attainment']:>9.0f}{f(row['measured_p50_ttft']):>11}{f(row['sim_p50_ttft']):>10}"
                         f"{f(row['measured_p50_tpot']):>11}{f(row['sim_p50_tpot']):>10}")
        out[mode] = {"admission_s": admission, "rows": rows,
                     "sim_goodput_per_gpu": bd.interpolated_goodput([r["per_gpu_rate"] for r in rows],
                                                                    [r["sim_attainment"] for r in rows])}
    state.data["simcheck"] = out
    _emit(lines)


# ---- figures --------------------------------------------------------------------------------------


def plots(state: State) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sweep, sim = state.data.get("sweep", {}), state.data.get("simcheck", {})
    title = f"{state.args.model} on {state.args.devices} x {state.data['device']}"
    if sweep:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for k, mode in enumerate(m for m in MODES if m in sweep):
            e = sweep[mode]
            xs = [r["per_gpu_rate"] for r in e["runs"]]
            line, = ax.plot(xs, [100 * r["summary"]["attainment"] for r in e["runs"]], marker="o",
                            label=f"{mode} ({_layout_label(Plan.from_dict(e['plan']))})")
            if mode in sim:
                ax.plot([r["per_gpu_rate"] for r in sim[mode]["rows"]],
                        [100 * r["sim_attainment"] for r in sim[mode]["rows"]], ls="--", marker="x",
                        color=line.get_color(), label=f"{mode}, simulated")
        ax.axhline(90, color="grey", ls=":", lw=1)
        ax.set_xlabel("rate per GPU (req/s)")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
        ax.set_title(f"{title}\nSLO TTFT {state.data['slo'][0]:g}s, TPOT {state.data['slo'][1]:g}s", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = state.file("attainment", "png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    b = state.data.get("breakdown")
    if b and b["per_rate"]:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        rows = [r for r in b["per_rate"] if r["breakdown"].get("requests")]
        labels = [f"{r['per_gpu_rate']:g}" for r in rows]
        bottom = [0.0] * len(rows)
        for ph in bd.PHASES:
            vals = [100 * r["breakdown"]["share_of_total"][ph] for r in rows]
            a1.bar(labels, vals, bottom=bottom, label=ph)
            bottom = [x + v for x, v in zip(bottom, vals)]
        a1.set_xlabel("rate per GPU (req/s)")
        a1.set_ylabel("share of latency (%)")
        a1.set_title("disaggregated: latency breakdown", fontsize=10)
        a1.legend(fontsize=8)
        for r in rows:
            c = r["migration"].get("cdf")
            if c:
                a2.plot([1e3 * x for x, _ in c], [y for _, y in c], label=f"{r['per_gpu_rate']:g} req/s/GPU")
        a2.set_xscale("log")
        a2.set_xlabel("KV migration time (ms)")
        a2.set_ylabel("CDF")
        cp = b.get("copy")
        a2.set_title("migration time" + (f" (copy bw {cp['gbps']:.3g} GB/s)" if cp else ""), fontsize=10)
        a2.legend(fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        p = state.file("breakdown", "png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


# ---- main -----------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    if args.part == "_probe":
        return _probe_main(args)
    if args.part == "_profile":
        return _profile_main(args)
    parts = list(PARTS) if args.part == "all" else [p.strip() for p in args.part.split(",")]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"--part {bad}: choose from {', '.join(PARTS)} or all")
    args.modes = [m.strip() for m in args.modes.split(",")]
    if any(m not in MODES for m in args.modes):
        raise ValueError(f"--modes {args.modes}: choose from {MODES}")
    if isinstance(args.rates, str):
        args.rates = [float(r) for r in args.rates.split(",")]
    profile_grid("cpu", args.profile_grid)  # a bad --profile-grid fails here, not in the profiling child
    from distllm_jax.workload.slo import PRESETS, resolve

    args.slo = args.slo or (f"{args.model}-sharegpt" if f"{args.model}-sharegpt" in PRESETS else "opt-13b-sharegpt")
    s = resolve(args.slo)
    args.slo_pair = (s.ttft, s.tpot)
    t_start = time.perf_counter()
    probe = _child(args, "_probe", ["--copy-mib", str(args.copy_mib)] if args.copy_mib else [])
    if args.devices is None:
        args.devices = probe["count"]
    if args.devices > probe["count"]:
        raise ValueError(f"--devices {args.devices}: only {probe['count']} {probe['device_kind']} device(s)")
    state = State(args, probe)
    copy = f"copy {probe['copy']['gbps']:.3g} GB/s" if probe.get("copy") else "no second device to copy to"
    print(f"{args.devices} x {probe['device_kind']} ({probe['backend']}, jax {probe['jax']}); {copy}", flush=True)
    if args.profile_now:
        tps = args.profile_tps or ",".join(str(t) for t in (1, 2, 4, 8) if t <= min(4, args.devices))
        path = state.file("profile", "json")
        res = _child(args, "_profile", ["--profile-tps", tps, "--profile", str(path), "--page-size", str(args.page_size)]
                     + (["--dtype", args.dtype] if args.dtype else [])
                     + (["--profile-grid", args.profile_grid] if args.profile_grid else []))
        state.data["profile_path"] = path.name
        state.data["profile_run"] = res
    elif args.profile:
        state.data["profile_path"] = args.profile
    timings = state.data.setdefault("part_seconds", {})
    for part in parts:
        t0 = time.perf_counter()
        {"plan": part_plan, "sweep": part_sweep, "breakdown": part_breakdown, "simcheck": part_simcheck}[part](state)
        timings[part] = time.perf_counter() - t0
        state.save()
    if "sweep" not in parts:
        _goodput_table(state)
    written = plots(state)
    state.save()
    print("\n==== summary ====")
    for t in TABLES:
        print(t + "\n")
    for p in [state.path, *written]:
        print(f"wrote {p}")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", default="all", help="plan, sweep, breakdown, simcheck (comma list) or all")
    p.add_argument("--modes", default=",".join(MODES), help="modes the sweep serves")
    p.add_argument("--model", default="opt-13b", help="built-in preset served with random weights")
    p.add_argument("--dtype", help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--devices", type=int, help="devices of the node (default: all local devices)")
    p.add_argument("--rates", default="0.5,1,1.5,2", help="per-GPU request rates (req/s), comma list")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--dataset", default="sharegpt", help="sharegpt | humaneval | longbench | file:PATH")
    p.add_argument("--slo", help="preset or 'TTFT,TPOT' seconds (default: <model>-sharegpt, else OPT-13B's)")
    p.add_argument("--seed", type=int, default=0, help="seed for the workload sample and the arrivals")
    p.add_argument("--profile", help="profile JSON from `distllm profile` on this device kind (or a shipped name)")
    p.add_argument("--profile-now", action="store_true", help="profile the engine here first (child process)")
    p.add_argument("--profile-tps", help="tensor degrees to profile (default: 1,2,4 up to --devices)")
    p.add_argument("--profile-grid", help="--profile-now's grid axes, e.g. 'prompt_lens=16,64;prompts=1,2;"
                   "batches=1,4;contexts=32,128;repeats=3' (axes left out keep the backend's default)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--num-pages", type=int, default=1024, help="KV pages per instance")
    p.add_argument("--max-decode-batch", type=int, default=32, help="requests in one decode step")
    p.add_argument("--prefill-token-budget", type=int, default=512, help="tokens packed into one prefill batch")
    p.add_argument("--max-seq-len", type=int, help="server context (default: serve's)")
    p.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth probe (default 1024 on GPU, 256 on CPU)")
    p.add_argument("--server-timeout", type=float, default=900, help="seconds a server may take to be ready")
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for `distllm serve` (repeat)")
    p.add_argument("--cache-dir", help="prepared-workload cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="bench/results/multi-gpu", help="folder for the JSON, plan and PNGs")


if __name__ == "__main__":
    _p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
