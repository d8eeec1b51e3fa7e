"""KV migration between two processes through jax's transfer server (CPU backend).

The prefill instance runs in a child process with its own 2 devices; this process holds the decode
instance, pulls each request's KV by uuid, checks it bit for bit against what the child offered, and
decodes on to the single-device reference tokens.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from distllm_jax.checkpoint import restore_params
from distllm_jax.engine import CheckpointSource, EngineConfig, InstanceSpec, SamplingParams
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.programs import Segment
from distllm_jax.engine.transfer_server import TransferKVReceiver, start_server
from distllm_jax.models.attention import REFERENCE
from model_runner import greedy_generate

PROMPTS = [[5, 9, 23, 7, 1, 100, 42, 17, 250, 3, 66], [3, 4], [77, 12, 15, 19, 21, 2, 8, 9, 11, 200, 201]]
N_NEW = 6


@pytest.mark.parametrize("src,dst", [((2, 1), (2, 1)), ((1, 2), (4, 1))])
def test_pull_from_another_process(converted, tmp_path, src, dst):
    """Then the sender dies with one offer not yet pulled: that pull fails, and the decode pool is
    left whole (a scatter of buffers that never arrived would poison all of it, and with it every
    request decoding there)."""
    _, ckpt = converted("llama-gqa-llama3")
    ecfg = EngineConfig(page_size=4, num_pages=48, max_seq_len=64, max_decode_batch=4, progress=False)
    spec = InstanceSpec(*dst)
    d = Instance("d", "decode", spec, jax.devices()[: spec.num_devices], CheckpointSource(ckpt), ecfg, REFERENCE)
    ranges = [[st.lo, st.hi] for st in d.stages]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    env.pop("XLA_FLAGS", None)
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "kv_sender_proc.py"), str(ckpt), str(tmp_path),
         str(src[0]), str(src[1]), json.dumps({"ranges": ranges, "tp": spec.tp}), json.dumps(PROMPTS + PROMPTS[:1])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        msg = json.loads(line)
        assert msg["pid"] != os.getpid()
        offers = pickle.loads(base64.b64decode(msg["offers"]))
        receiver = TransferKVReceiver(start_server())
        tables = []
        for i, (pr, offer) in enumerate(zip(PROMPTS, offers)):
            table = d.alloc.ensure(i, len(pr) + N_NEW)
            receiver.fetch(offer, d, table[: offer.num_pages])
            sent = np.load(tmp_path / f"sent-{i}.npz")
            got = d.host_pages(table[: offer.num_pages])
            assert got[0].tobytes() == sent["k"].tobytes() and got[1].tobytes() == sent["v"].tobytes()
            tables.append(table)
    finally:
        child.kill()
        child.communicate(timeout=60)
    spare = d.alloc.ensure("spare", len(PROMPTS[0]))
    with pytest.raises(Exception):
        receiver.fetch(offers[-1], d, spare[: offers[-1].num_pages])
    assert d.pools_ok()
    for i, (pr, table) in enumerate(zip(PROMPTS, tables)):
        sent = np.load(tmp_path / f"sent-{i}.npz")
        got = d.host_pages(table[: sent["k"].shape[1]])
        assert got[0].tobytes() == sent["k"].tobytes() and got[1].tobytes() == sent["v"].tobytes()

    out = [[t] for t in msg["first"][: len(PROMPTS)]]
    for step in range(N_NEW - 1):
        segs = [Segment([o[-1]], len(pr) + step, tables[i], SamplingParams(), 0)
                for i, (pr, o) in enumerate(zip(PROMPTS, out))]
        for o, t in zip(out, d.run("decode", [segs])[0].ids):
            o.append(int(t))
    cfg, ref = restore_params(ckpt)
    assert out == greedy_generate(ref, cfg, PROMPTS, N_NEW)

