"""KV migration between two processes on one machine's accelerator, through jax's transfer server
(``jax.experimental.transfer``, the path between Ray actors and between hosts), beside the in-process
``device_put`` path.

    python -m bench.kv_pull_processes --preset opt-1.3b --lengths 16,128,512,2032 --out bench/results/x.json

This process holds a decode instance and a prefill instance of its own; a child process holds
another prefill instance (the same seeded random weights), prefills the prompts and offers each
request's pages several times. Here each offer is pulled into the decode pool and timed (pull,
wait for the bytes, scatter), the first pull of each request is compared bit for bit with the pages
the child offered (SHA-256 of the host copies), and the decode instance decodes on from the pulled
pages to the tokens it decodes from its own prefill. The in-process path (``LocalKVPuller``: gather,
``device_put``, scatter) is timed on the same requests. Each process caps its share of the
accelerator's memory (``--mem-fraction``), as two instances sharing one card must.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _build(args, role: str, name: str):
    import jax

    from distllm_jax.engine import DeviceRandomSource, EngineConfig, InstanceSpec, RandomSource
    from distllm_jax.engine.engine import attention_impl
    from distllm_jax.engine.instance import Instance
    from distllm_jax.kv_cache import pages_for
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset

    gpu = jax.default_backend() == "gpu"
    cfg = ModelConfig.from_hf_dict(preset(args.preset))
    source = (DeviceRandomSource if gpu else RandomSource)(cfg, "bfloat16" if gpu else "float32")
    max_len = max(args.lengths) + args.new_tokens + 1
    pages = 2 * sum(pages_for(n + args.new_tokens, args.page_size) for n in args.lengths) + 2
    ecfg = EngineConfig(page_size=args.page_size, num_pages=pages, max_seq_len=max_len,
                        prefill_token_budget=max(args.lengths), max_prefill_seqs=1, max_decode_batch=len(args.lengths),
                        progress=False, dtype=source.dtype)
    return Instance(name, role, InstanceSpec(1), jax.devices()[:1], source, ecfg, attention_impl("auto"))


def _prompts(args, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(3, vocab, n)] for n in args.lengths]


def _prefill(inst, prompts) -> list[int]:
    """Each prompt prefilled alone (its own table, keyed by its index); the first tokens."""
    from distllm_jax.engine import SamplingParams
    from distllm_jax.engine.programs import Segment

    first = []
    for i, pr in enumerate(prompts):
        seg = Segment(pr, 0, inst.alloc.ensure(i, len(pr)), SamplingParams(), 0)
        first.append(int(inst.run("prefill", [[seg]])[0].ids[0]))
    return first


def _digest(inst, pages) -> str:
    k, v = inst.host_pages(pages)
    return hashlib.sha256(k.tobytes() + v.tobytes()).hexdigest()


def child(args) -> None:
    """The prefill side: prefill, offer each request ``repeats + 1`` times, print one JSON line, and
    stay alive (the offered buffers live here) until stdin closes."""
    from distllm_jax.engine.transfer_server import TransferKVSender, start_server

    p = _build(args, "prefill", "p-child")
    prompts = _prompts(args, p.cfg.vocab_size)
    first = _prefill(p, prompts)
    dst = json.loads(args.child)
    sender = TransferKVSender(start_server(), max_pages=max(len(p.alloc.table(i)) for i in range(len(prompts))))
    offers, offer_ms, digests = [], [], []
    for i in range(len(prompts)):
        pages = p.alloc.table(i)
        digests.append(_digest(p, pages))
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            offers.append(sender.offer(p, pages, [tuple(r) for r in dst["ranges"]], dst["tp"]))
            offer_ms.append(1e3 * (time.perf_counter() - t0))
    print(json.dumps({"pid": os.getpid(), "first": first, "digests": digests, "offer_ms": offer_ms,
                      "offers": base64.b64encode(pickle.dumps(offers)).decode()}), flush=True)
    sys.stdin.read()


def _decode(inst, prompts, tables, first, n: int) -> list[list[int]]:
    from distllm_jax.engine import SamplingParams
    from distllm_jax.engine.programs import Segment

    out = [[t] for t in first]
    for step in range(n - 1):
        segs = [Segment([o[-1]], len(pr) + step, tables[i], SamplingParams(), 0)
                for i, (pr, o) in enumerate(zip(prompts, out))]
        for o, t in zip(out, inst.run("decode", [segs])[0].ids):
            o.append(int(t))
    return out


def main(args) -> int:
    import jax

    from distllm_jax.engine.transfer import LocalKVPuller, wait_pools
    from distllm_jax.engine.transfer_server import TransferKVReceiver, start_server

    d = _build(args, "decode", "d")
    env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": str(args.mem_fraction)}
    spec = json.dumps({"ranges": [[st.lo, st.hi] for st in d.stages], "tp": d.spec.tp})
    cmd = [sys.executable, "-m", "bench.kv_pull_processes", "--child", spec, "--preset", args.preset,
           "--lengths", ",".join(map(str, args.lengths)), "--repeats", str(args.repeats),
           "--page-size", str(args.page_size), "--new-tokens", str(args.new_tokens)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parent.parent)
    try:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the prefill process ended: {proc.stderr.read()[-4000:]}")
        msg = json.loads(line)
        offers = pickle.loads(base64.b64decode(msg["offers"]))
        receiver = TransferKVReceiver(start_server())
        prompts = _prompts(args, d.cfg.vocab_size)
        kv_bytes = 2 * d.cfg.num_layers * d.cfg.num_kv_heads * d.cfg.head_dim * jax.numpy.dtype(d.dtype).itemsize
        rows, tables, exact = [], [], []
        for i, pr in enumerate(prompts):
            mine = offers[i * (args.repeats + 1):(i + 1) * (args.repeats + 1)]
            table = d.alloc.ensure(("pulled", i), len(pr) + args.new_tokens)
            n = mine[0].num_pages
            times = []
            for r, offer in enumerate(mine):  # the first pull of each size compiles its scatter
                t0 = time.perf_counter()
                receiver.fetch(offer, d, table[:n])
                wait_pools(d)
                times.append(time.perf_counter() - t0)
                if r == 0:
                    exact.append(_digest(d, table[:n]) == msg["digests"][i])
            tables.append(table)
            rows.append({"tokens": len(pr), "pages": n, "bytes": n * args.page_size * kv_bytes,
                         "transfer_server_ms": 1e3 * statistics.median(times[1:]),
                         "offer_ms": statistics.median(msg["offer_ms"][i * (args.repeats + 1) + 1:(i + 1) * (args.repeats + 1)])})
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)

    # the in-process path on the same requests, from a prefill instance of this process
    p = _build(args, "prefill", "p-local")
    first = _prefill(p, prompts)
    puller = LocalKVPuller(max(r["pages"] for r in rows))
    local_tables = []
    for i, row in enumerate(rows):
        table = d.alloc.ensure(("local", i), row["tokens"] + args.new_tokens)
        times = []
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            puller.pull(p, p.alloc.table(i), d, table[:row["pages"]])
            wait_pools(d)
            times.append(time.perf_counter() - t0)
        row["local_ms"] = 1e3 * statistics.median(times[1:])
        for k in ("transfer_server", "local"):
            row[f"{k}_GBps"] = row["bytes"] / (row[f"{k}_ms"] / 1e3) / 1e9
        local_tables.append(table)
    pulled = _decode(d, prompts, tables, msg["first"], args.new_tokens)
    reference = _decode(d, prompts, local_tables, first, args.new_tokens)
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
           "preset": args.preset, "mem_fraction": args.mem_fraction, "two_processes": msg["pid"] != os.getpid(),
           "bit_exact": exact, "first_tokens_equal": msg["first"] == first,
           "decoded_equal": pulled == reference, "rows": rows}
    print(f"{out['device']} ({out['backend']}), {args.preset}: pages bit-exact {exact}, first tokens equal "
          f"{out['first_tokens_equal']}, decoded tokens equal {out['decoded_equal']}")
    print(f"{'tokens':>7}{'MB':>9}{'offer ms':>10}{'pull ms':>10}{'GB/s':>8}{'local ms':>10}{'GB/s':>8}")
    for r in rows:
        print(f"{r['tokens']:>7}{r['bytes'] / 1e6:>9.1f}{r['offer_ms']:>10.2f}{r['transfer_server_ms']:>10.2f}"
              f"{r['transfer_server_GBps']:>8.1f}{r['local_ms']:>10.2f}{r['local_GBps']:>8.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0 if all(exact) and out["decoded_equal"] and out["first_tokens_equal"] else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="opt-1.3b", help="a preset's real shapes with random weights")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[16, 128, 512, 2032],
                    help="prompt lengths (tokens), one request each")
    ap.add_argument("--repeats", type=int, default=5, help="timed pulls per request (after one that warms)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens decoded on from the pulled pages")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--mem-fraction", type=float, default=0.3,
                    help="the prefill process's share of the accelerator's memory (set this process's own "
                         "with XLA_PYTHON_CLIENT_MEM_FRACTION)")
    ap.add_argument("--out", help="write the results here (JSON)")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # the prefill process: the decode side's layout
    a = ap.parse_args()
    if a.child:
        child(a)
    else:
        raise SystemExit(main(a))
