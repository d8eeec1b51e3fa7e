"""A minimal greedy generator over the engine's one model program (prefill once, then decode steps).

Test-only: pages are handed out consecutively with no reuse; the engine's allocator and scheduler own
real serving. It runs exactly the program the engine compiles (``programs.STAGE_STEP``, one stage).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from distllm_jax.engine.programs import STAGE_STEP
from distllm_jax.kv_cache import NULL_PAGE, create_pool
from distllm_jax.models import DecodeBatch, PrefillBatch
from distllm_jax.models.attention import REFERENCE
from distllm_jax.models.serving_layout import serving_params


def _step(kind, params, cfg, batch, kv):
    """The whole model on one stage: float32 logits of the step's logit rows, and the new pool."""
    (_, logits, _), kv = STAGE_STEP(params, None, batch, kv, kind=kind, cfg=cfg, impl=REFERENCE, first=True,
                                    last=True)
    return logits, kv


def PREFILL(params, cfg, batch, kv):  # noqa: N802 - named as the compiled programs it stands for
    return _step("prefill", params, cfg, batch, kv)


def DECODE(params, cfg, batch, kv):  # noqa: N802
    return _step("decode", params, cfg, batch, kv)


def pack_prompts(prompts, page_tables, page_size, all_logits=False, pad_to=None):
    toks, pos, seg, slots, last = [], [], [], [], []
    for i, p in enumerate(prompts):
        for j, t in enumerate(p):
            toks.append(t)
            pos.append(j)
            seg.append(i)
            slots.append(page_tables[i][j // page_size] * page_size + j % page_size)
        last.append(len(toks) - 1)
    n = len(toks)
    pad = (pad_to or n) - n
    toks += [0] * pad
    pos += [0] * pad
    seg += [-1] * pad
    slots += [NULL_PAGE * page_size] * pad
    idx = list(range(n)) if all_logits else last
    as32 = lambda x: jnp.asarray(np.asarray(x, np.int32))  # noqa: E731
    return PrefillBatch(as32(toks), as32(pos), as32(seg), as32(slots), as32(idx))


def greedy_generate(params, cfg, prompts, n_new, page_size=4, num_pages=None, kv_sharding=None,
                    dtype=jnp.float32, return_prefill_logits=False):
    """Greedy tokens for each prompt; small page size so sequences span many pages. ``params`` in
    the checkpoint's layout, as a source loads them (placed in the serving layout here, as an
    instance places them)."""
    params = serving_params(params, cfg)
    max_len = max(len(p) for p in prompts) + n_new
    per_seq = -(-max_len // page_size)
    num_pages = num_pages or 1 + per_seq * len(prompts)
    kv = create_pool(cfg, num_pages, page_size, dtype, sharding=kv_sharding)
    # interleave page ids across sequences so a wrong page table shows up as wrong tokens
    tables = np.zeros((len(prompts), per_seq), np.int32)
    for j in range(per_seq):
        for i in range(len(prompts)):
            tables[i, j] = 1 + j * len(prompts) + i
    batch = pack_prompts(prompts, tables, page_size, all_logits=return_prefill_logits)
    logits, kv = PREFILL(params, cfg, batch, kv)
    logits = np.asarray(logits)
    if return_prefill_logits:
        ends = np.cumsum([len(p) for p in prompts]) - 1
        first = logits[ends].argmax(-1)
    else:
        first = logits.argmax(-1)
    out = [[int(t)] for t in first]
    lengths = np.array([len(p) for p in prompts], np.int32)
    for _ in range(n_new - 1):
        b = DecodeBatch(
            jnp.asarray(np.array([o[-1] for o in out], np.int32)),
            jnp.asarray(lengths),
            jnp.asarray(tables),
        )
        step_logits, kv = DECODE(params, cfg, b, kv)
        nxt = np.asarray(step_logits).argmax(-1)
        for o, t in zip(out, nxt):
            o.append(int(t))
        lengths += 1
    return (out, logits) if return_prefill_logits else out
