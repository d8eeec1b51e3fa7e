"""The prefill side of the two-process KV test: its own process with its own 2 CPU devices.

Prefills the prompts, offers each request's KV on a transfer server, writes the pages it offered
(host copies, for the bit-for-bit check) and prints one JSON line: first tokens and pickled offers.
Stays alive (the offered buffers live here) until stdin says so.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from distllm_jax.engine import CheckpointSource, EngineConfig, InstanceSpec, SamplingParams  # noqa: E402
from distllm_jax.engine.instance import Instance  # noqa: E402
from distllm_jax.engine.programs import Segment  # noqa: E402
from distllm_jax.engine.transfer_server import TransferKVSender, start_server  # noqa: E402
from distllm_jax.models.attention import REFERENCE  # noqa: E402


def main() -> None:
    ckpt, out_dir, tp, pp, dst = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
    prompts = json.loads(sys.argv[6])
    ecfg = EngineConfig(page_size=4, num_pages=48, max_seq_len=64, max_decode_batch=4, progress=False)
    p = Instance("p", "prefill", InstanceSpec(tp, pp), jax.devices()[: tp * pp], CheckpointSource(ckpt), ecfg,
                 REFERENCE)
    segs = [Segment(pr, 0, p.alloc.ensure(i, len(pr)), SamplingParams(), 0) for i, pr in enumerate(prompts)]
    first = [int(t) for t in p.run("prefill", [segs])[0].ids[: len(prompts)]]
    sender = TransferKVSender(start_server(), max_pages=16)
    offers = []
    for i in range(len(prompts)):
        pages = p.alloc.table(i)
        offers.append(sender.offer(p, pages, [tuple(r) for r in dst["ranges"]], dst["tp"]))
        k, v = p.host_pages(pages)
        np.savez(os.path.join(out_dir, f"sent-{i}.npz"), k=k, v=v)
    blob = base64.b64encode(pickle.dumps(offers)).decode()
    print(json.dumps({"first": first, "offers": blob, "pid": os.getpid()}), flush=True)
    sys.stdin.readline()  # the receiver is done pulling


if __name__ == "__main__":
    main()
