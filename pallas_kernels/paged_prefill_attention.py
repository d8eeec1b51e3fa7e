"""Packed queries attending to their sequence's cached prefix and to themselves, through the paged
pool: a flash-attention Pallas kernel for chunked prefill and prefix caching.

A chunk of a prompt (or a prompt whose first pages are cached) starts at an arbitrary absolute position
and attends to every earlier key of its sequence, already in the pool, plus its own keys causally (the
caller writes the step's K/V first). Segments are packed end to end along the token axis: one or a few
long chunks, and in a chunked-prefill step also every running sequence's decode token (a segment of
length 1).

The grid is (query block, KV head), and a query block is a run of at most ``block_q`` tokens of *one*
segment: the wrapper cuts each segment into such runs (a decode token is a run of its own) and passes
each block's start, length, segment and key range as a small int array. A program holds the block's
tokens times the G query heads sharing one KV head (GQA; G padded to a power of two) as one tile of
rows, so each K/V page is read once per query block for all its query heads, not once per query token
(what running every token as a decode row costs: about n^2/2 tokens of KV for an n-token chunk). It
loops over blocks of its segment's pages up to the block's highest position, with an online softmax;
key blocks that every row sees (most of a long prefix) take no mask, the rest are masked by position
<= the query's. Blocks never span segments because a block of many decode tokens would loop over all
their contexts in one program, serially, where one program per decode token spreads them over the GPU
(its tile uses G of its rows, but reading its pages, not the tile's arithmetic, bounds it).
Rows of the tile past the block's length are loaded but never stored (masked store); padding tokens
(segment -1) form blocks with no keys and get zeros. There are at most T / block_q + 2S + 1 blocks
(S segments, each contiguous, with padding between or after them); programs past the real count exit.

The plain-jnp reference is :func:`distllm_jax.models.attention.paged_prefix_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash import LOG2E, online_softmax_init, online_softmax_step
from pallas_kernels.paged_decode_attention import ignore_poison

_ROWS = 64  # (token, query head) rows a program holds by default: a 64-row tile, like the prefill kernel
_PAD_PAGE = 0  # pads page tables: the kernel never attends past a segment's positions
_START, _COUNT, _SEG, _OPEN, _KEYS = range(5)  # the columns of the per-block metadata


def _kernel(q_ref, k_ref, v_ref, pt_ref, pos_ref, meta_ref, o_ref, *, scale: float, block_q: int,
            pages_per_block: int, page_size: int, width: int):
    _, g, dh = q_ref.shape
    rows = block_q * g
    count = meta_ref[_COUNT]

    @pl.when(count > 0)
    def _():
        start = meta_ref[_START]
        seg = meta_ref[_SEG]
        q = q_ref[pl.ds(start, block_q)].reshape(rows, dh)
        pos_q = pos_ref[pl.ds(start * g, rows)]  # each token's position, repeated for its g heads
        bk = pages_per_block * page_size
        qk_scale = scale * LOG2E  # softmax in base 2: exp2 is the hardware's instruction

        def step(j, carry, masked: bool):
            pages = pt_ref[pl.ds(seg * width + j * pages_per_block, pages_per_block)]
            k = k_ref[pages].reshape(bk, dh)
            v = v_ref[pages].reshape(bk, dh)
            logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * qk_scale
            ok = (j * bk + jnp.arange(bk))[None, :] <= pos_q[:, None] if masked else None
            return online_softmax_step(carry, logits, v, ok)

        n_blocks = pl.cdiv(meta_ref[_KEYS], bk)
        n_open = meta_ref[_OPEN] // bk  # key blocks every row of the block sees
        carry = jax.lax.fori_loop(0, n_open, functools.partial(step, masked=False), online_softmax_init(rows, dh))
        o, m, l = jax.lax.fori_loop(n_open, n_blocks, functools.partial(step, masked=True), carry)
        o = (o / jnp.where(l > 0, l, 1.0)[:, None]).reshape(block_q, g, dh).astype(o_ref.dtype)
        mine = jnp.broadcast_to((jnp.arange(block_q) < count)[:, None, None], o.shape)
        plgpu.store(o_ref.at[pl.ds(start, block_q)], o, mask=mine)


def _blocks(seg: jax.Array, pos: jax.Array, block_q: int, n: int) -> jax.Array:
    """``[n, 5]`` int32: per query block its first token, its length (0: no block, the program
    exits), its segment, how many keys all its tokens see (lowest position + 1) and how many any of
    them sees (highest position + 1); padding blocks see none."""
    T = seg.shape[0]
    t = jnp.arange(T)
    run = jnp.concatenate([jnp.ones(1, bool), seg[1:] != seg[:-1]])
    run_start = jax.lax.cummax(jnp.where(run, t, 0))
    block = jnp.cumsum(run | ((t - run_start) % block_q == 0)) - 1  # [T]: each token's block
    real = seg >= 0
    big = jnp.iinfo(jnp.int32).max
    start = jnp.full(n, big, jnp.int32).at[block].min(t)
    count = jnp.zeros(n, jnp.int32).at[block].add(1)
    bseg = jnp.zeros(n, jnp.int32).at[block].max(jnp.maximum(seg, 0))
    lo = jnp.full(n, big, jnp.int32).at[block].min(jnp.where(real, pos + 1, 0))
    hi = jnp.zeros(n, jnp.int32).at[block].max(jnp.where(real, pos + 1, 0))
    return jnp.stack([jnp.where(count > 0, start, 0), count, bseg, jnp.where(count > 0, lo, 0), hi], axis=1)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "pages_per_block", "num_warps", "num_stages",
                                             "interpret", "poison"))
def paged_prefill_attention(
    q: jax.Array,  # [T, H, Dh]
    k_pages: jax.Array,  # [P, page_size, KVH, Dh]
    v_pages: jax.Array,
    page_tables: jax.Array,  # [S, W] int32
    segment_ids: jax.Array,  # [T] int32
    positions: jax.Array,  # [T] int32
    scale: float,
    *,
    block_q: int | None = None,
    pages_per_block: int = 4,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Attention of packed query tokens over their own sequence's keys at positions <= theirs, read
    through the page tables (the cached prefix and this step's tokens, already written to the pool).

    Args:
        q: ``[T, H, Dh]`` queries, segments packed end to end, each segment's tokens contiguous; H a
            multiple of KVH (grouped-query attention).
        k_pages, v_pages: one layer of the pool, ``[P, page_size, KVH, Dh]``, page_size a power of two.
        page_tables: ``[S, W]`` int32, one row per segment: its sequence's page ids in order; entries
            past the segment's highest position are never attended to (any valid page id will do).
        segment_ids: ``[T]`` int32, each token's row of ``page_tables``; -1 marks padding.
        positions: ``[T]`` int32, each token's absolute position in its sequence (cached prefix
            included), so a segment may start anywhere, mid-page too.
        scale: the logits' scale (1 / sqrt(Dh) for these models).
        block_q: query tokens a program holds at most (a power of two); None takes 64 rows' worth,
            64 // G tokens. On the GPU block_q * G needs at least 16 rows (the smallest tensor-core dot).
        pages_per_block: pages a program loads per loop step (a power of two; keys per step are
            pages_per_block * page_size, at least 16 on the GPU).
        num_warps, num_stages: Triton's launch parameters for each program.
        interpret: run the kernel in Pallas' interpreter (CPU, tests).
        poison: write into a NaN-filled buffer, so that an element the kernel skipped shows (tests).

    Returns:
        ``[T, H, Dh]`` in q's dtype; padding rows are zeros.
    """
    T, H, Dh = q.shape
    _, ps, KVH, _ = k_pages.shape
    S, W = page_tables.shape
    G = H // KVH
    Gp = _pow2(G)
    bq = min(block_q or max(1, _ROWS // Gp), _pow2(T))
    n = -(-T // bq) + 2 * S + 1
    ppb = min(pages_per_block, _pow2(W))
    Wp = -(-W // ppb) * ppb  # every loop step's pages lie inside the segment's row
    # bq rows past the end: a block's tile may reach past the last token (those rows are not stored)
    qg = jnp.pad(q.reshape(T, KVH, G, Dh), ((0, bq), (0, 0), (0, Gp - G), (0, 0)))
    seg, pos = segment_ids.astype(jnp.int32), positions.astype(jnp.int32)
    pos_rows = jnp.pad(jnp.repeat(pos, Gp), (0, bq * Gp))
    tables = jnp.pad(page_tables.astype(jnp.int32), ((0, 0), (0, Wp - W)), constant_values=_PAD_PAGE).reshape(-1)
    kernel = functools.partial(_kernel, scale=scale, block_q=bq, pages_per_block=ppb, page_size=ps, width=Wp)
    params = {}
    if not interpret:
        params["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out_shape = jax.ShapeDtypeStruct(qg.shape, q.dtype)
    extra, aliases = (), {}
    if poison:
        extra, aliases = (jnp.full(out_shape.shape, jnp.nan, q.dtype),), {6: 0}
        kernel = ignore_poison(kernel, 1)
    heads = pl.BlockSpec((T + bq, None, Gp, Dh), lambda b, h: (0, h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(n, KVH),
        in_specs=[
            heads,
            pl.BlockSpec((k_pages.shape[0], ps, None, Dh), lambda b, h: (0, 0, h, 0)),
            pl.BlockSpec((v_pages.shape[0], ps, None, Dh), lambda b, h: (0, 0, h, 0)),
            pl.BlockSpec((S * Wp,), lambda b, h: (0,)),
            pl.BlockSpec(((T + bq) * Gp,), lambda b, h: (0,)),
            pl.BlockSpec((None, 5), lambda b, h: (b, 0)),
        ] + [pl.BlockSpec(memory_space=pl.ANY)] * len(extra),
        out_specs=heads,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name="distllm_paged_prefill_attention",
        **params,
    )(qg, k_pages, v_pages, tables, pos_rows, _blocks(seg, pos, bq, n), *extra)
    return out[:T, :, :G].reshape(T, H, Dh)
