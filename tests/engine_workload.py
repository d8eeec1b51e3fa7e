"""A shared mixed workload for engine tests, its Hugging Face greedy reference, and helpers."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import torch

from distllm_jax.engine import Engine, EngineConfig, SamplingParams

MAX_LEN = 64
PAGE = 4


def workload(n: int = 32, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output length): prompts 1..40 tokens, outputs 1..12 tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        plen = int(rng.integers(1, 41))
        out.append(([int(t) for t in rng.integers(3, 250, plen)], int(rng.integers(1, 13))))
    return out


BURST_POOL = 41  # 40 usable pages of PAGE tokens


def overflowing_burst(n: int = 12, seed: int = 5) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) of a burst whose worst case is over three times BURST_POOL's pages
    (prompts 4..24 tokens, outputs 20..36): sent at once, it runs only with pages on demand and
    preemption."""
    rng = np.random.default_rng(seed)
    return [([int(t) for t in rng.integers(3, 250, int(rng.integers(4, 25)))], int(rng.integers(20, 37)))
            for _ in range(n)]


def hf_greedy(model, prompt: list[int], n_new: int) -> list[int]:
    """Greedy tokens from the torch model, one full forward per token (no cache to get wrong)."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n_new):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def small_config(**kw) -> EngineConfig:
    base = dict(page_size=PAGE, num_pages=96, max_seq_len=MAX_LEN, prefill_token_budget=64,
                max_prefill_seqs=8, max_decode_batch=8, min_token_bucket=32, progress=False,
                check_transfers=True)
    base.update(kw)
    return EngineConfig(**base)


def run_arrivals(engine: Engine, items, params_for, gap_s: float = 0.004, seed: int = 1):
    """Submit requests at random (exponential) gaps from a thread; returns final outputs in order."""
    rnd = random.Random(seed)
    streams = [None] * len(items)

    def feed():
        for i, (prompt, n) in enumerate(items):
            streams[i] = engine.submit(prompt, params_for(i, n))
            time.sleep(rnd.expovariate(1 / gap_s))

    t = threading.Thread(target=feed)
    t.start()
    t.join()
    return [s.result() for s in streams]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)
