"""The Pallas kernels (interpret mode on the CPU) against float64 references, at many shapes; outputs
are poisoned (NaN-filled, aliased) so an element a kernel fails to write shows up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import packed_prefill_attention, paged_decode_attention, paged_prefill_attention
from pallas_kernels.paged_decode_attention import ignore_poison

TOL = 2e-5  # float32 kernels vs float64 math (relative to the output's scale)


def ref_decode(q, k_pages, v_pages, tables, lengths, scale):
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    B, H, Dh = q.shape
    KVH = k_pages.shape[2]
    ps = k_pages.shape[1]
    out = np.zeros((B, H, Dh))
    for b in range(B):
        n = lengths[b]
        k = k_pages[tables[b]].reshape(-1, KVH, Dh)[:n]
        v = v_pages[tables[b]].reshape(-1, KVH, Dh)[:n]
        for h in range(H):
            kh = h // (H // KVH)
            s = k[:, kh] @ q[b, h] * scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[:, kh]
    assert ps > 0
    return out


def ref_prefill(q, k, v, seg, pos, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    T, H, Dh = q.shape
    G = H // k.shape[1]
    out = np.zeros((T, H, Dh))
    for t in range(T):
        if seg[t] < 0:
            continue
        keys = np.nonzero((seg == seg[t]) & (pos <= pos[t]))[0]
        for h in range(H):
            s = k[keys, h // G] @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[keys, h // G]
    return out


def ref_mixed(q, k_pages, v_pages, tables, seg, pos, scale):
    """Each real token attends to its sequence's positions ``0..pos`` read from that sequence's pages
    (the step's own tokens included: they were written before attention runs)."""
    q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
    T, H, Dh = q.shape
    KVH = k_pages.shape[2]
    G = H // KVH
    out = np.zeros((T, H, Dh))
    for t in range(T):
        if seg[t] < 0:
            continue
        k = k_pages[tables[seg[t]]].reshape(-1, KVH, Dh)[: pos[t] + 1]
        v = v_pages[tables[seg[t]]].reshape(-1, KVH, Dh)[: pos[t] + 1]
        for h in range(H):
            s = k[:, h // G] @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[:, h // G]
    return out


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(1e-6, np.abs(b).max()))


DECODE_CASES = [
    # (batch, q_heads, kv_heads, head_dim, lengths) — GQA ratios 1/4/8, head dims 64/80/128
    (3, 4, 4, 64, [1, 16, 37]),
    (2, 8, 2, 80, [17, 64]),
    (4, 16, 2, 128, [5, 100, 128, 33]),
    (1, 8, 8, 64, [1]),
    (5, 32, 4, 64, [128, 1, 15, 16, 17]),
]


@pytest.mark.parametrize("B,H,KVH,Dh,lengths", DECODE_CASES)
@pytest.mark.parametrize("ppb,splits", [(8, 4), (2, 1), (1, 8)])
def test_paged_decode(B, H, KVH, Dh, lengths, ppb, splits):
    check_paged_decode(B, H, KVH, Dh, lengths, ppb, splits, W=8)


@pytest.mark.parametrize("W,lengths", [(9, [144, 3]), (33, [528, 17, 300])])
def test_paged_decode_table_width_not_power_of_two(W, lengths):
    """An engine whose context limit gives a table width like 33 (max_seq_len 528): Triton needs
    power-of-two blocks, so the wrapper pads the table with the null page (found on the H100)."""
    check_paged_decode(len(lengths), 8, 2, 64, lengths, 8, 4, W=W)


@pytest.mark.parametrize("H,KVH,heads", [(8, 8, 4), (8, 2, 2), (12, 6, 4)])
def test_paged_decode_several_heads_a_program(H, KVH, heads):
    """Programs that attend for several KV heads (4 of 6 falls back to 3, a divisor)."""
    check_paged_decode(3, H, KVH, 64, [130, 1, 77], 2, 2, W=16, heads=heads)


@pytest.mark.parametrize("B,H,KVH,Dh,lengths", DECODE_CASES[:3])
@pytest.mark.parametrize("ppb,splits,heads", [(2, 1, 1), (1, 4, 2), (4, 8, 1)])
def test_paged_decode_prefetching_the_next_block(B, H, KVH, Dh, lengths, ppb, splits, heads):
    """The loop that loads block i + 1 before attending to block i; splits of one block, and
    splits with no block at all (length 1 against 8 splits), reload a block that stays in range."""
    check_paged_decode(B, H, KVH, Dh, lengths, ppb, splits, W=8, heads=heads, prefetch=True)


@pytest.mark.parametrize("W,lengths,ppb,splits", [(32, [40, 1, 17], 2, 3), (64, [100, 513], 4, 5),
                                                 (1, [9, 16], 1, 8), (16, [250], 8, 2)])
@pytest.mark.parametrize("prefetch", [False, True])
def test_paged_decode_splits_follow_the_real_length(W, lengths, ppb, splits, prefetch):
    """Splits share each sequence's own pages, not the table's width: short sequences under a wide
    table, split counts that divide nothing, more splits than a one-page table has blocks."""
    check_paged_decode(len(lengths), 8, 2, 64, lengths, ppb, splits, W=W, prefetch=prefetch)


@pytest.mark.parametrize("B,H,KVH,Dh,lengths", DECODE_CASES[1:3])
@pytest.mark.parametrize("ppb,splits,heads,prefetch", [(2, 1, 1, False), (4, 3, 2, True)])
def test_paged_decode_head_major_pages(B, H, KVH, Dh, lengths, ppb, splits, heads, prefetch):
    """Pages laid out [P, KVH, page_size, Dh] give the same attention as the pool's own layout."""
    check_paged_decode(B, H, KVH, Dh, lengths, ppb, splits, W=8, heads=heads, prefetch=prefetch, head_major=True)


def check_paged_decode(B, H, KVH, Dh, lengths, ppb, splits, W, heads=1, prefetch=False, head_major=False):
    rng = np.random.default_rng(hash((B, H, KVH, Dh, ppb, splits, W, heads)) % 2**32)
    ps = 16
    P = B * W + 3
    q = rng.standard_normal((B, H, Dh)).astype(np.float32)
    k = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    v = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    tables = (rng.permutation(P - 1)[: B * W].reshape(B, W) + 1).astype(np.int32)
    lens = np.array(lengths, np.int32)
    scale = Dh**-0.5
    kin, vin = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if head_major else (k, v)
    out = paged_decode_attention(q, kin, vin, tables, lens, scale, pages_per_block=ppb, splits=splits,
                                 heads_per_program=heads, prefetch=prefetch, head_major=head_major,
                                 interpret=True, poison=True)
    out = np.asarray(out)
    assert not np.isnan(out).any(), "an output element was never written"
    assert rel_err(out, ref_decode(q, k, v, tables, lens, scale)) < TOL


PREFILL_CASES = [
    # (prompt lengths, T bucket, q heads, kv heads, head dim, block)
    ([5, 17, 1, 40], 64, 8, 2, 64, 16),
    ([64], 64, 4, 4, 128, 32),
    ([1], 16, 8, 1, 80, 16),
    ([30, 30, 3], 64, 16, 2, 64, 16),
    ([100, 27], 128, 4, 4, 64, 32),
]


@pytest.mark.parametrize("lengths,T,H,KVH,Dh,block", PREFILL_CASES)
def test_packed_prefill(lengths, T, H, KVH, Dh, block):
    rng = np.random.default_rng(sum(lengths) * 1000 + T + Dh)
    seg = np.full(T, -1, np.int32)
    pos = np.zeros(T, np.int32)
    o = 0
    for i, n in enumerate(lengths):
        seg[o : o + n], pos[o : o + n] = i, np.arange(n)
        o += n
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    k = rng.standard_normal((T, KVH, Dh)).astype(np.float32)
    v = rng.standard_normal((T, KVH, Dh)).astype(np.float32)
    scale = Dh**-0.5
    out = np.asarray(packed_prefill_attention(q, k, v, seg, pos, scale, block_q=block, block_k=block,
                                              interpret=True, poison=True))
    assert not np.isnan(out).any(), "an output element was never written"
    assert (out[seg < 0] == 0).all()
    assert rel_err(out, ref_prefill(q, k, v, seg, pos, scale)) < TOL


def test_poisoning_catches_unwritten_elements():
    """The poison mechanism itself: a kernel that writes half its output leaves NaNs behind."""
    def half(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]

    x = jnp.ones(8, jnp.float32)
    out = pl.pallas_call(
        ignore_poison(half, 1), out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
        in_specs=[pl.BlockSpec((8,), lambda: (0,)), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((8,), lambda: (0,)),
        input_output_aliases={1: 0}, interpret=True,
    )(x, jnp.full(8, jnp.nan, jnp.float32))
    assert np.isnan(np.asarray(out)[4:]).all() and (np.asarray(out)[:4] == 1).all()


@pytest.mark.parametrize("chunks", [[(0, 5), (37, 1), (16, 9)], [(100, 1), (0, 1), (3, 20), (64, 16)]])
def test_mixed_step_matches_reference(chunks):
    """Chunked prefill on the kernels: prompt chunks (a cached prefix + n new tokens) and decode tokens
    packed into one step, with padding, against float64 math; the XLA path (which gathers every page)
    is held to the same reference, so the two cannot agree on a shared mistake."""
    from distllm_jax.models.attention import paged_prefix_attention
    from distllm_jax.models.pallas_attention import pallas_attention

    rng = np.random.default_rng(len(chunks))
    H, KVH, Dh, ps, W = 8, 2, 64, 16, 8
    S, T = len(chunks), 64
    P = S * W + 2
    k = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    v = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    tables = (rng.permutation(P - 1)[: S * W].reshape(S, W) + 1).astype(np.int32)
    seg = np.full(T, -1, np.int32)
    pos = np.zeros(T, np.int32)
    o = 0
    for i, (start, n) in enumerate(chunks):
        seg[o : o + n], pos[o : o + n] = i, np.arange(start, start + n)
        o += n
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    scale = Dh**-0.5
    out = np.asarray(pallas_attention(interpret=True).mixed(q, k, v, tables, seg, pos, scale))
    xla = np.asarray(paged_prefix_attention(q, k, v, tables, seg, pos, scale))
    ref = ref_mixed(q, k, v, tables, seg, pos, scale)
    real = seg >= 0
    assert np.isfinite(out).all()
    assert rel_err(out[real], ref[real]) < TOL
    assert rel_err(xla[real], ref[real]) < TOL


def prefix_layout(rng, chunks, T, ps, W):
    """A paged-prefill step: each chunk ``(prefix, n)`` is n new tokens of its own sequence at positions
    prefix..prefix+n-1, packed end to end (padding after them); each sequence's pages are scattered
    over the pool and its table row is padded with the null page 0 past what it needs."""
    need = [-(-(start + n) // ps) for start, n in chunks]
    assert max(need) <= W and sum(n for _, n in chunks) <= T
    P = sum(need) + 3
    free = list(rng.permutation(np.arange(1, P)))
    tables = np.zeros((len(chunks), W), np.int32)
    seg = np.full(T, -1, np.int32)
    pos = np.zeros(T, np.int32)
    o = 0
    for i, ((start, n), m) in enumerate(zip(chunks, need)):
        tables[i, :m] = [free.pop() for _ in range(m)]
        seg[o : o + n], pos[o : o + n] = i, np.arange(start, start + n)
        o += n
    return P, tables, seg, pos


def random_chunks(rng, T, ps, max_ctx, segments):
    """Decode tokens and chunks, at prefixes of 0, page-aligned, mid-page and long, in at most T tokens."""
    chunks, used = [], 0
    for i in range(segments):
        n = 1 if rng.random() < 0.4 else int(rng.integers(2, 20))
        n = min(n, T - used - (segments - 1 - i))
        start = [0, ps * int(rng.integers(1, 4)), int(rng.integers(1, 3 * ps)), max_ctx - n][rng.integers(4)]
        chunks.append((start, n))
        used += n
    return chunks


# 7 segments (45 tokens, padding after them): prefixes 0, mid-page, page-aligned, decode tokens (length
# 1), a long prefix spanning many key blocks (None: the table's end); tokens 8-15 hold 4 segments, and
# the last two segments are longer than a block of 8 tokens
FEATURES = [(0, 7), (6, 1), (16, 3), (37, 1), (2, 1), (9, 12), (None, 20)]

PREFIX_SHAPES = [
    # (T, q heads, kv heads, head dim, page size, table width, block_q, pages per block)
    (64, 4, 4, 32, 4, 40, 8, 2),  # MHA, small pages: key blocks of 8
    (64, 8, 2, 32, 16, 24, 4, 1),  # GQA 4: 4 tokens x 4 heads = 16 rows a program
    (60, 8, 2, 16, 16, 9, None, 4),  # T not a multiple of the block, odd table width
    (64, 6, 2, 16, 4, 40, 16, 4),  # GQA 3 (heads padded to 4 rows)
]


def check_prefix(q, k, v, tables, seg, pos, tol, **kw):
    from distllm_jax.models.attention import paged_prefix_attention

    scale = q.shape[-1] ** -0.5
    out = np.asarray(paged_prefill_attention(q, k, v, tables, seg, pos, scale, interpret=True, poison=True, **kw))
    ref = np.asarray(paged_prefix_attention(q, k, v, tables, seg, pos, scale))
    assert not np.isnan(out).any(), "an output element was never written"
    assert (out[seg < 0] == 0).all()
    real = seg >= 0
    assert rel_err(out[real], np.asarray(ref[real], np.float64)) < tol


@pytest.mark.parametrize("T,H,KVH,Dh,ps,W,block_q,ppb", PREFIX_SHAPES)
def test_paged_prefill_matches_reference(T, H, KVH, Dh, ps, W, block_q, ppb):
    """The feature layout, then seeded random layouts of the same shapes, against the XLA reference."""
    rng = np.random.default_rng(T * H + ps * W)
    max_ctx = W * ps
    layouts = [[(max_ctx - n if s is None else s, n) for s, n in FEATURES]]
    layouts += [random_chunks(rng, T, ps, max_ctx, len(FEATURES)) for _ in range(6)]
    P = len(FEATURES) * W + 3  # the same pool (shape) for every layout: one compilation
    k = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    v = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    q = rng.standard_normal((T, H, Dh)).astype(np.float32)
    for chunks in layouts:
        used, tables, seg, pos = prefix_layout(rng, chunks, T, ps, W)
        assert used <= P
        check_prefix(q, k, v, tables, seg, pos, TOL, block_q=block_q, pages_per_block=ppb)


def test_paged_prefill_bf16():
    rng = np.random.default_rng(7)
    T, H, KVH, Dh, ps, W = 64, 8, 2, 64, 16, 24
    P, tables, seg, pos = prefix_layout(rng, [(300, 30), (0, 1), (17, 12), (5, 1)], T, ps, W)
    k, v = (jnp.asarray(rng.standard_normal((P, ps, KVH, Dh)), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((T, H, Dh)), jnp.bfloat16)
    check_prefix(q, k, v, tables, seg, pos, 2e-2, block_q=8, pages_per_block=2)
