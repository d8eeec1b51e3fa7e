"""The two entry points the engine calls: prefill over a packed batch and a decode step.

Both are pure: ``(params, inputs, kv) -> (logits, kv)``. They are meant to be jitted by the caller
with ``cfg`` and ``impl`` static and the KV pool donated, so XLA updates the pool in place.

Pipeline stages reuse :func:`run_layers` over a slice of ``params["layers"]`` and the matching slice
of the pool (the pool's layer axis always equals the number of layers the params hold).
"""

from __future__ import annotations

from types import ModuleType
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distllm_jax.kv_cache import KVPool
from distllm_jax.models import llama, opt
from distllm_jax.models.attention import REFERENCE, AttentionImpl
from distllm_jax.models.config import ModelConfig


class PrefillBatch(NamedTuple):
    """Prompts packed along one token axis; padding (to a bucketed T) has segment id -1.

    ``slots`` are flat pool slots (page * page_size + offset) where each token's K/V is written;
    padding tokens point into the null page. ``logit_indices`` picks the rows that need logits
    (the last token of each prompt when serving; every token in parity tests).
    """

    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    segment_ids: jax.Array  # [T] int32
    slots: jax.Array  # [T] int32
    logit_indices: jax.Array  # [N] int32


class DecodeBatch(NamedTuple):
    """One new token per sequence. ``positions`` is the new token's position (= tokens already cached);
    padding rows use position 0 and an all-null page table."""

    tokens: jax.Array  # [B] int32
    positions: jax.Array  # [B] int32
    page_tables: jax.Array  # [B, pages_per_seq] int32


def family_module(cfg: ModelConfig) -> ModuleType:
    return opt if cfg.family == "opt" else llama


def run_layers(
    layers: list[dict],
    cfg: ModelConfig,
    x: jax.Array,
    positions: jax.Array,
    kv: KVPool,
    attend_fn,
) -> tuple[jax.Array, KVPool]:
    """Apply a stack of layers; ``attend_fn(k_pages, v_pages, q, k, v) -> (o, k_pages, v_pages)``
    writes this layer's new K/V into its pages and attends."""
    fam = family_module(cfg)
    k_pool, v_pool = kv.k, kv.v
    for i, lp in enumerate(layers):
        state = {}

        def attend(q, k, v, i=i, state=state):
            o, state["k"], state["v"] = attend_fn(k_pool[i], v_pool[i], q, k, v)
            return o

        x = fam.layer(lp, cfg, x, positions, attend)
        k_pool = k_pool.at[i].set(state["k"])
        v_pool = v_pool.at[i].set(state["v"])
    return x, KVPool(k_pool, v_pool)


def prefill(
    params: dict,
    cfg: ModelConfig,
    batch: PrefillBatch,
    kv: KVPool,
    impl: AttentionImpl = REFERENCE,
) -> tuple[jax.Array, KVPool]:
    """Run packed prompts through the model, writing their K/V; returns logits [N, vocab] (float32)."""
    fam = family_module(cfg)
    scale = cfg.head_dim**-0.5
    x = fam.embed(params, cfg, batch.tokens, batch.positions)

    def attend_fn(k_pages, v_pages, q, k, v):
        k_pages = impl.write(k_pages, batch.slots, k)
        v_pages = impl.write(v_pages, batch.slots, v)
        o = impl.prefill(q, k, v, batch.segment_ids, batch.positions, scale)
        return o, k_pages, v_pages

    x, kv = run_layers(params["layers"], cfg, x, batch.positions, kv, attend_fn)
    return fam.final(params, cfg, x[batch.logit_indices]), kv


def decode(
    params: dict,
    cfg: ModelConfig,
    batch: DecodeBatch,
    kv: KVPool,
    impl: AttentionImpl = REFERENCE,
) -> tuple[jax.Array, KVPool]:
    """One decoding step for a batch; returns logits [B, vocab] (float32)."""
    fam = family_module(cfg)
    scale = cfg.head_dim**-0.5
    ps = kv.page_size
    pos = batch.positions
    page = jnp.take_along_axis(batch.page_tables, (pos // ps)[:, None], axis=1)[:, 0]
    slots = page * ps + pos % ps
    lengths = pos + 1
    x = fam.embed(params, cfg, batch.tokens, pos)

    def attend_fn(k_pages, v_pages, q, k, v):
        k_pages = impl.write(k_pages, slots, k)
        v_pages = impl.write(v_pages, slots, v)
        o = impl.decode(q, k_pages, v_pages, batch.page_tables, lengths, scale)
        return o, k_pages, v_pages

    x, kv = run_layers(params["layers"], cfg, x, pos, kv, attend_fn)
    return fam.final(params, cfg, x), kv
