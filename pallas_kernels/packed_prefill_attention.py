"""Causal attention over a packed batch (prompts laid end to end, no padding between them) as a
flash-attention Pallas kernel.

Inputs are the engine's packed prefill tensors: q ``[T, H, Dh]``, k/v ``[T, KVH, Dh]`` (GQA: H a
multiple of KVH), ``segment_ids [T]`` (-1 marks bucket padding) and ``positions [T]`` (position inside
its own prompt). The grid is (query block, head). A query block attends only from the start of the
earliest prompt it touches up to its own last row (the causal diagonal): key blocks of earlier prompts
and every block above the diagonal are never loaded, so a batch of many short prompts costs what each
prompt's own triangle costs, not T². Inside that range a mask keeps keys of the same prompt at
positions <= the query's. Padding rows produce zeros.

The plain-jnp reference is :func:`distllm_jax.models.attention.packed_causal_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.flash import LOG2E, online_softmax_init, online_softmax_step


def _kernel(q_ref, k_ref, v_ref, segq_ref, posq_ref, segk_ref, posk_ref, o_ref, *, scale: float, block_k: int):
    i = pl.program_id(0)
    bq, dh = q_ref.shape
    seg_q = segq_ref[...]
    pos_q = posq_ref[...]
    rows = i * bq + jnp.arange(bq)
    # first key any row here can see: the start of the earliest prompt in the block
    starts = jnp.where(seg_q >= 0, rows - pos_q, i * bq + bq)
    first = starts.min()
    kv_lo = first // block_k
    kv_hi = pl.cdiv(i * bq + bq, block_k)
    # When every row belongs to one prompt, the key blocks wholly between that prompt's start and this
    # block's first row need no mask at all (same prompt, all in the past): only the ragged first block
    # and the diagonal blocks are masked.
    one_prompt = (seg_q.min() == seg_q.max()) & (seg_q.min() >= 0)
    open_lo = jnp.where(one_prompt, jnp.minimum(pl.cdiv(first, block_k), kv_hi), kv_lo)
    open_hi = jnp.where(one_prompt, jnp.maximum(open_lo, (i * bq) // block_k), kv_lo)
    open_lo = jnp.where(one_prompt, open_lo, kv_lo)
    q = q_ref[...]
    qk_scale = scale * LOG2E  # softmax in base 2: exp2 is the hardware's instruction

    def step(j, carry, masked: bool):
        ks = pl.ds(j * block_k, block_k)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * qk_scale
        ok = None
        if masked:
            seg_k = segk_ref[ks]
            pos_k = posk_ref[ks]
            ok = (seg_q[:, None] == seg_k[None, :]) & (pos_k[None, :] <= pos_q[:, None]) & (seg_q[:, None] >= 0)
        return online_softmax_step(carry, logits, v, ok)

    masked = functools.partial(step, masked=True)
    carry = online_softmax_init(bq, dh)
    carry = jax.lax.fori_loop(kv_lo, open_lo, masked, carry)  # the ragged start (or everything)
    carry = jax.lax.fori_loop(open_lo, open_hi, functools.partial(step, masked=False), carry)
    o, m, l = jax.lax.fori_loop(jnp.maximum(open_hi, open_lo), kv_hi, masked, carry)
    o_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret", "poison"))
def packed_prefill_attention(
    q: jax.Array,  # [T, H, Dh]
    k: jax.Array,  # [T, KVH, Dh]
    v: jax.Array,
    segment_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    scale: float,
    *,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Causal attention of every packed token over the earlier tokens of its own prompt.

    Args:
        q: ``[T, H, Dh]`` queries, T a multiple of both blocks (the engine buckets T).
        k, v: ``[T, KVH, Dh]``, H a multiple of KVH (grouped-query attention).
        segment_ids: ``[T]`` int32, the prompt each token belongs to; -1 marks padding.
        positions: ``[T]`` int32, each token's position inside its own prompt.
        scale: the logits' scale (1 / sqrt(Dh) for these models).
        block_q, block_k: rows of queries and of keys a program holds at once (powers of two).
        num_warps, num_stages: Triton's launch parameters for each program.
        interpret: run the kernel in Pallas' interpreter (CPU, tests).
        poison: write into a NaN-filled buffer, so that an element the kernel skipped shows (tests).

    Returns:
        ``[T, H, Dh]`` in q's dtype; padding rows are zeros.
    """
    T, H, Dh = q.shape
    KVH = k.shape[1]
    G = H // KVH
    bq, bk = min(block_q, T), min(block_k, T)
    if T % bq or T % bk:
        raise ValueError(f"{T} tokens: a multiple of the blocks ({bq}, {bk}) is needed (the engine buckets T)")
    kernel = functools.partial(_kernel, scale=scale, block_k=bk)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    extra, aliases = (), {}
    if poison:
        from pallas_kernels.paged_decode_attention import ignore_poison

        extra, aliases = (jnp.full((T, H, Dh), jnp.nan, q.dtype),), {7: 0}
        kernel = ignore_poison(kernel, 1)
    return pl.pallas_call(
        kernel,
        grid=(T // bq, H),
        in_specs=[
            pl.BlockSpec((bq, None, Dh), lambda i, h: (i, h, 0)),
            pl.BlockSpec((T, None, Dh), lambda i, h: (0, h // G, 0)),
            pl.BlockSpec((T, None, Dh), lambda i, h: (0, h // G, 0)),
            pl.BlockSpec((bq,), lambda i, h: (i,)),
            pl.BlockSpec((bq,), lambda i, h: (i,)),
            pl.BlockSpec((T,), lambda i, h: (0,)),
            pl.BlockSpec((T,), lambda i, h: (0,)),
        ] + [pl.BlockSpec(memory_space=pl.ANY)] * len(extra),
        out_specs=pl.BlockSpec((bq, None, Dh), lambda i, h: (i, h, 0)),
        out_shape=jax.ShapeDtypeStruct((T, H, Dh), q.dtype),
        input_output_aliases=aliases,
        interpret=interpret,
        name="distllm_packed_prefill_attention",
        **params,
    )(q, k, v, segment_ids, positions, segment_ids, positions, *extra)


def causal_flops(lengths: list[int], H: int, Dh: int) -> float:
    """Useful FLOPs (QK^T and PV over each prompt's causal triangle)."""
    return sum(4.0 * H * Dh * n * (n + 1) / 2 for n in lengths)
