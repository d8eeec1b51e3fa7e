"""Paged decode attention: one query token per sequence against its K/V pages, as a Pallas kernel.

Layout is the engine's pool, one layer: ``k_pages``/``v_pages`` ``[pages, page_size, kv_heads, head_dim]``;
queries ``[batch, q_heads, head_dim]`` with q_heads a multiple of kv_heads (GQA). The grid is
(sequence, KV head, split): each program takes the q heads sharing one KV head (padded to 16 rows, the
smallest tile a tensor-core dot takes) and one contiguous share of the pages the sequence holds, loops
over blocks of pages with an online softmax, and stops at the sequence's length, so work follows each
sequence's real context, not the table's width. Splits (split-K) keep the GPU busy at small batch on
long contexts; they divide each sequence's own pages, so a short sequence under a wide table still uses
all of them. Their partial results (output, running max, sum) merge afterwards with a numerically
stable log-sum-exp combine; with one split the program writes its finished rows directly.

The plain-jnp reference is :func:`distllm_jax.models.attention.paged_decode_attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.decode_tuning import DecodeConfig, fill_splits, tuned


_NEG = -1e30
_MIN_ROWS = 16


def _kernel(q_ref, k_ref, v_ref, pt_ref, len_ref, *out_refs, scale: float, pages_per_block: int, splits: int,
            page_size: int, heads: int, prefetch: bool, head_major: bool, kv_heads: int):
    s = pl.program_id(2)
    h0 = pl.program_id(1) * heads
    _, rows, dh = q_ref.shape
    width = pt_ref.shape[0]
    length = len_ref[0]
    # the splits share the pages this sequence really holds, not the table's width: a short sequence
    # under a wide table (the engine's context limit) still spreads over every split; each split's
    # share is whole blocks, so every block starts block-aligned and only the length mask is needed
    n_pages = pl.cdiv(length, page_size)
    per_split = pl.cdiv(pl.cdiv(n_pages, splits), pages_per_block) * pages_per_block
    first = s * per_split
    last = jnp.minimum(first + per_split, n_pages)
    n_blocks = jnp.maximum(pl.cdiv(last - first, pages_per_block), 0)
    block_tokens = pages_per_block * page_size
    qk_scale = scale * 1.4426950408889634  # base-2 softmax (exp2 is the hardware's instruction)

    def load(i):
        # a block past the split's last (the prefetch after the final one) reloads that last block;
        # an empty split's first load (prefetch) is kept inside the table too
        start = first + jnp.maximum(jnp.minimum(i, n_blocks - 1), 0) * pages_per_block
        start = jnp.minimum(start, width - pages_per_block)
        # the pool as rows [P * ps * KVH, Dh]: each token's row index comes from its own page id, so a
        # block is one 2-D gather straight into the tile the dot takes. With nothing between the load
        # and the dot, Triton's pipeliner (num_stages > 1) turns the loads into asynchronous copies
        # that run stages ahead of the math; a gather of [pages, ps, Dh] reshaped afterwards is not
        # pipelined.
        t = jnp.arange(block_tokens)
        page = pt_ref[start + t // page_size]
        if head_major:  # [P, KVH, ps, Dh]: one head's share of a page is ps adjacent rows
            row = lambda h: (page * kv_heads + h0 + h) * page_size + t % page_size  # noqa: E731
        else:  # [P, ps, KVH, Dh]: one head's rows of a page sit KVH rows apart
            row = lambda h: (page * page_size + t % page_size) * kv_heads + h0 + h  # noqa: E731
        # the heads of one program share the page-id reads
        return start, tuple((k_ref[row(h), :], v_ref[row(h), :]) for h in range(heads))

    def attend(start, tiles, acc):
        tok = start * page_size + jnp.arange(block_tokens)
        out = []
        for (k, v), (o, m, l), qh in zip(tiles, acc, range(heads)):
            logits = jnp.dot(q_ref[qh], k.T, preferred_element_type=jnp.float32) * qk_scale
            logits = jnp.where((tok < length)[None, :], logits, _NEG)
            m_new = jnp.maximum(m, logits.max(axis=-1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(logits - m_new[:, None])
            l_new = alpha * l + p.sum(axis=-1)
            o_new = alpha[:, None] * o + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            out.append((o_new, m_new, l_new))
        return tuple(out)

    init = tuple((jnp.zeros((rows, dh), jnp.float32), jnp.full((rows,), _NEG, jnp.float32),
                  jnp.zeros((rows,), jnp.float32)) for _ in range(heads))
    if prefetch:
        # the next block's loads are issued before this block's math, so a program keeps two blocks
        # of K/V in flight (in registers) instead of waiting on each load in turn
        def body(i, carry):
            acc, (start, tiles) = carry
            nxt = load(i + 1)
            return attend(start, tiles, acc), nxt

        final, _ = jax.lax.fori_loop(0, n_blocks, body, (init, load(0)))
    else:
        final = jax.lax.fori_loop(0, n_blocks, lambda i, acc: attend(*load(i), acc), init)
    if len(out_refs) == 1:
        # one split: the program holds the whole softmax, so it writes the finished rows in q's dtype
        # and no partials or merge follow
        (o_ref,) = out_refs
        for h, (o, _, l) in enumerate(final):
            o_ref[h] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)
        return
    o_ref, m_ref, l_ref = out_refs
    for h, (o, m, l) in enumerate(final):
        o_ref[h] = o
        m_ref[h] = m
        l_ref[h] = l


def ignore_poison(kernel, n: int):
    """The aliased poison inputs are only there to pre-fill the outputs; the kernel never reads them."""

    def wrapped(*refs):
        ins, outs = refs[: -2 * n], refs[-n:]
        return kernel(*ins, *outs)

    return wrapped


def _choose(width: int, pages_per_block: int, splits: int) -> tuple[int, int]:
    """A block size that divides the (power-of-two) table and at most one split per block of it."""
    ppb = max(1, min(pages_per_block, width))
    while width % ppb:
        ppb -= 1
    return ppb, max(1, min(splits, width // ppb))


# what pads a table to a power of two: any page id the pool has (page 0 always is); the kernel
# stops at each sequence's length, so what it holds is never attended to
_PAD_PAGE = 0


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "splits", "heads_per_program", "num_warps",
                                             "num_stages", "prefetch", "head_major", "interpret", "poison"))
def paged_decode_attention(
    q: jax.Array,  # [B, H, Dh]
    k_pages: jax.Array,  # [P, page_size, KVH, Dh]
    v_pages: jax.Array,
    page_tables: jax.Array,  # [B, W] int32
    lengths: jax.Array,  # [B] int32, cached tokens incl. the new one
    scale: float,
    *,
    pages_per_block: int | None = None,
    splits: int | None = None,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefetch: bool | None = None,
    head_major: bool = False,
    interpret: bool = False,
    poison: bool = False,
) -> jax.Array:
    """Attention of each sequence's one new query token over its cached K/V, read through its page table.

    Args:
        q: ``[B, H, Dh]``, one token per sequence; H a multiple of KVH (grouped-query attention).
        k_pages, v_pages: one layer of the pool, ``[P, page_size, KVH, Dh]``.
        page_tables: ``[B, W]`` int32 page ids of each sequence, in order; entries past a sequence's
            length are never read.
        lengths: ``[B]`` int32 cached tokens of each sequence, the new one included (at least 1).
        scale: the logits' scale (1 / sqrt(Dh) for these models).
        pages_per_block: pages a program loads per loop step.
        splits: programs per (sequence, KV head), sharing the sequence's pages (split-K); with more
            than one, each writes float32 partials that the merge reads back.
        heads_per_program: KV heads one program attends for (a divisor of KVH, else the largest one
            below it): they share its page-table reads, and its loads of one token's K (and V) rows
            span that many heads' adjacent bytes in the pool instead of one head's.
        num_warps, num_stages: Triton's launch parameters for each program.
        prefetch: issue the next block's loads before this block's math (two blocks in flight).
            Each launch choice left None comes from the stored sweep for this device and shape
            (:mod:`pallas_kernels.decode_tuning`); ``splits`` None there fills the GPU about twice.
        head_major: the pages are ``[P, KVH, page_size, Dh]`` instead, so that one head's share of a
            page is one contiguous read (page_size rows) rather than rows KVH apart.
        interpret: run the kernel in Pallas' interpreter (CPU, tests).
        poison: write into NaN-filled buffers, so that an element the kernel skipped shows (tests).

    Returns:
        ``[B, H, Dh]`` in q's dtype.
    """
    B, H, Dh = q.shape
    _, ps, KVH, _ = k_pages.shape
    if head_major:
        _, KVH, ps, _ = k_pages.shape
    W = 1 << (page_tables.shape[1] - 1).bit_length()
    cfg = _resolve(tuned(jax.devices()[0].device_kind if not interpret else "interpret", H, KVH, Dh, B, W * ps),
                   pages_per_block=pages_per_block, splits=splits, heads_per_program=heads_per_program,
                   num_warps=num_warps, num_stages=num_stages, prefetch=prefetch)
    HB = max(1, min(cfg.heads_per_program, KVH))
    while KVH % HB:
        HB -= 1
    splits = fill_splits(B, KVH, HB) if cfg.splits is None else cfg.splits
    G = H // KVH
    if W != page_tables.shape[1]:
        # Triton blocks must be powers of two: pad the table with the null page; the kernel stops at
        # each sequence's length, so the padding is never attended to.
        page_tables = jnp.pad(page_tables, ((0, 0), (0, W - page_tables.shape[1])), constant_values=_PAD_PAGE)
    ppb, S = _choose(W, cfg.pages_per_block, splits)
    rows = max(_MIN_ROWS, G)
    qg = q.reshape(B, KVH, G, Dh)
    if rows != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - G), (0, 0)))
    kernel = functools.partial(_kernel, scale=scale, pages_per_block=ppb, splits=S, page_size=ps, heads=HB,
                               prefetch=cfg.prefetch, head_major=head_major, kv_heads=KVH)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        params["compiler_params"] = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if S == 1:
        out_shape = [jax.ShapeDtypeStruct((B, KVH, rows, Dh), q.dtype)]
        out_specs = [pl.BlockSpec((None, HB, rows, Dh), lambda b, h, s: (b, h, 0, 0))]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((S, B, KVH, rows, Dh), jnp.float32),
            jax.ShapeDtypeStruct((S, B, KVH, rows), jnp.float32),
            jax.ShapeDtypeStruct((S, B, KVH, rows), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, None, HB, rows, Dh), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, HB, rows), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, HB, rows), lambda b, h, s: (s, b, h, 0)),
        ]
    extra, aliases = (), {}
    if poison:
        extra = tuple(jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape)
        aliases = {5 + i: i for i in range(len(out_shape))}
        kernel = ignore_poison(kernel, len(out_shape))
    k_rows, v_rows = k_pages.reshape(-1, Dh), v_pages.reshape(-1, Dh)  # free: the pool is contiguous
    kv_spec = pl.BlockSpec((k_rows.shape[0], Dh), lambda b, h, s: (0, 0))
    outs = pl.pallas_call(
        kernel,
        grid=(B, KVH // HB, S),
        in_specs=[
            pl.BlockSpec((None, HB, rows, Dh), lambda b, h, s: (b, h, 0, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, W), lambda b, h, s: (b, 0)),
            pl.BlockSpec((None, 1), lambda b, h, s: (b, 0)),
        ] + [pl.BlockSpec(memory_space=pl.ANY)] * len(extra),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        name="distllm_paged_decode_attention",
        **params,
    )(qg, k_rows, v_rows, page_tables, lengths.reshape(B, 1), *extra)
    if S == 1:
        return outs[0][:, :, :G].reshape(B, H, Dh)
    o, m, l = outs
    # merge the splits: rescale each by exp(m_s - max_s m_s); an empty split has l = 0 and adds nothing
    m_all = m.max(axis=0)
    w = jnp.exp2(m - m_all[None])  # m is in base-2 units
    l_all = (l * w).sum(axis=0)
    o_all = (o * w[..., None]).sum(axis=0) / jnp.where(l_all > 0, l_all, 1.0)[..., None]
    return o_all[:, :, :G].reshape(B, H, Dh).astype(q.dtype)


def _resolve(base: DecodeConfig, **given) -> DecodeConfig:
    """``base`` with the launch choices the caller gave explicitly."""
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def bytes_moved(B: int, H: int, KVH: int, Dh: int, lengths_sum: int, itemsize: int) -> int:
    """What the kernel must read and write at least: every cached K and V row once, q and the output."""
    return 2 * lengths_sum * KVH * Dh * itemsize + 2 * B * H * Dh * itemsize


__all__ = ["paged_decode_attention", "bytes_moved", "DecodeConfig"]
