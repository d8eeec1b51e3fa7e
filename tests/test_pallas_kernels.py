"""The Pallas kernels (interpret mode on the CPU) against float64 references, at many shapes; outputs
are poisoned (NaN-filled, aliased) so an element a kernel fails to write shows up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import packed_prefill_attention, paged_decode_attention
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


def check_paged_decode(B, H, KVH, Dh, lengths, ppb, splits, W):
    rng = np.random.default_rng(hash((B, H, KVH, Dh, ppb, splits, W)) % 2**32)
    ps = 16
    P = B * W + 3
    q = rng.standard_normal((B, H, Dh)).astype(np.float32)
    k = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    v = rng.standard_normal((P, ps, KVH, Dh)).astype(np.float32)
    tables = (rng.permutation(P - 1)[: B * W].reshape(B, W) + 1).astype(np.int32)
    lens = np.array(lengths, np.int32)
    scale = Dh**-0.5
    out = paged_decode_attention(q, k, v, tables, lens, scale, pages_per_block=ppb, splits=splits,
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
