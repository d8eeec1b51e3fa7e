"""The model's pieces for every step kind: :func:`embed`, the layers (:data:`LAYERS`: prefill over a
packed batch, a decode step, a mixed chunked-prefill step) and :func:`final`.

All are pure; the engine composes them into its one program, ``engine.programs.stage_step``, jitted
with ``cfg`` and ``impl`` static and the KV pool donated, so XLA updates the pool in place. Pipeline
stages run :func:`run_layers` over a slice of ``params["layers"]`` and the matching slice of the pool
(the pool's layer axis always equals the number of layers the params hold).
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
from distllm_jax.shapes import StepKind


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


class MixedBatch(NamedTuple):
    """Packed tokens whose sequences may already have K/V cached (chunked prefill, SplitFuse).

    Each segment is a run of consecutive tokens of one sequence starting at any position: a prompt
    chunk or a single decode token. ``page_tables`` has one row per segment; ``logit_indices`` picks
    each segment's last token (padding segments point at token 0 and are ignored by the caller).
    """

    tokens: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, absolute positions
    segment_ids: jax.Array  # [T] int32, -1 marks padding
    slots: jax.Array  # [T] int32
    page_tables: jax.Array  # [S, pages_per_seq] int32
    logit_indices: jax.Array  # [S] int32


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
    k_pool, v_pool = list(kv.k), list(kv.v)
    for i, lp in enumerate(layers):
        state = {}

        def attend(q, k, v, i=i, state=state):
            o, state["k"], state["v"] = attend_fn(k_pool[i], v_pool[i], q, k, v)
            return o

        x = fam.layer(lp, cfg, x, positions, attend)
        k_pool[i], v_pool[i] = state["k"], state["v"]
    return x, KVPool(tuple(k_pool), tuple(v_pool))


def embed(params: dict, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    return family_module(cfg).embed(params, cfg, tokens, positions)


def final(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and LM head: float32 logits for the rows of ``x``."""
    return family_module(cfg).final(params, cfg, x)


def _write_then(impl: AttentionImpl, slots: jax.Array, attend):
    """An ``attend_fn`` for :func:`run_layers`: write this step's K/V at ``slots``, then
    ``attend(q, k, v, k_pages, v_pages)``."""

    def attend_fn(k_pages, v_pages, q, k, v):
        k_pages = impl.write(k_pages, slots, k)
        v_pages = impl.write(v_pages, slots, v)
        return attend(q, k, v, k_pages, v_pages), k_pages, v_pages

    return attend_fn


def prefill_layers(
    layers: list[dict], cfg: ModelConfig, x: jax.Array, batch: PrefillBatch, kv: KVPool,
    impl: AttentionImpl = REFERENCE,
) -> tuple[jax.Array, KVPool]:
    """Packed prompts through a stack of layers (all of them, or one pipeline stage's)."""
    scale = cfg.head_dim**-0.5
    attend = _write_then(impl, batch.slots,
                         lambda q, k, v, kp, vp: impl.prefill(q, k, v, batch.segment_ids, batch.positions, scale))
    return run_layers(layers, cfg, x, batch.positions, kv, attend)


def decode_layers(
    layers: list[dict], cfg: ModelConfig, x: jax.Array, batch: DecodeBatch, kv: KVPool,
    impl: AttentionImpl = REFERENCE,
) -> tuple[jax.Array, KVPool]:
    scale = cfg.head_dim**-0.5
    ps = kv.page_size
    pos = batch.positions
    page = jnp.take_along_axis(batch.page_tables, (pos // ps)[:, None], axis=1)[:, 0]
    slots = page * ps + pos % ps
    lengths = pos + 1
    attend = _write_then(impl, slots, lambda q, k, v, kp, vp: impl.decode(q, kp, vp, batch.page_tables, lengths, scale))
    return run_layers(layers, cfg, x, pos, kv, attend)


def mixed_layers(
    layers: list[dict], cfg: ModelConfig, x: jax.Array, batch: MixedBatch, kv: KVPool,
    impl: AttentionImpl = REFERENCE,
) -> tuple[jax.Array, KVPool]:
    scale = cfg.head_dim**-0.5
    attend = _write_then(impl, batch.slots, lambda q, k, v, kp, vp: impl.mixed(
        q, kp, vp, batch.page_tables, batch.segment_ids, batch.positions, scale))
    return run_layers(layers, cfg, x, batch.positions, kv, attend)


LAYERS = {StepKind.PREFILL: prefill_layers, StepKind.DECODE: decode_layers, StepKind.MIXED: mixed_layers}


def logit_rows(kind: StepKind, batch, x: jax.Array) -> jax.Array:
    """The rows that need logits: every decode row; the last token of each prompt (or chunk) otherwise."""
    return x if kind == StepKind.DECODE else x[batch.logit_indices]
