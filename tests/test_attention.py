"""The reference attention paths agree with plain dense attention, whatever the packing or paging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from distllm_jax.models.attention import packed_causal_attention, paged_decode_attention, write_kv_slots


# jitted, as the engine's step programs run them: one program per shape, not one per operation
packed_jit = jax.jit(packed_causal_attention, static_argnums=5)
paged_decode_jit = jax.jit(paged_decode_attention, static_argnums=5)
write_jit = jax.jit(write_kv_slots)


def dense_causal(q, k, v, scale):
    """One sequence, no packing: [L, H, Dh] with K/V heads repeated for GQA."""
    H, KVH = q.shape[1], k.shape[1]
    k = np.repeat(k, H // KVH, axis=1)
    v = np.repeat(v, H // KVH, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) * scale
    L = q.shape[0]
    s = np.where(np.tril(np.ones((L, L), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, v)


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    pad=st.integers(0, 5),
    kvh=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_packed_equals_per_sequence(lengths, pad, kvh, seed):
    rng = np.random.default_rng(seed)
    H, Dh = 4, 8
    T = sum(lengths) + pad
    q = rng.standard_normal((T, H, Dh), np.float32)
    k = rng.standard_normal((T, kvh, Dh), np.float32)
    v = rng.standard_normal((T, kvh, Dh), np.float32)
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(lengths)] + [np.full(pad, -1)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad, int)]).astype(np.int32)
    out = np.asarray(packed_jit(q, k, v, jnp.asarray(seg), jnp.asarray(pos), 0.3))
    off = 0
    for n in lengths:
        ref = dense_causal(q[off : off + n], k[off : off + n], v[off : off + n], 0.3)
        np.testing.assert_allclose(out[off : off + n], ref, atol=1e-5)
        off += n
    assert np.all(out[off:] == 0), "padding rows must be zero"


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    page_size=st.sampled_from([1, 4, 8]),
    kvh=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_paged_decode_equals_dense(lengths, page_size, kvh, seed):
    """Contexts scattered over random pages give the same result as the contiguous context."""
    rng = np.random.default_rng(seed)
    H, Dh = 4, 8
    B = len(lengths)
    per_seq = -(-max(lengths) // page_size)
    num_pages = 1 + B * per_seq
    perm = rng.permutation(np.arange(1, num_pages))
    tables = perm.reshape(B, per_seq).astype(np.int32)
    k_pages = np.zeros((num_pages, page_size, kvh, Dh), np.float32)
    v_pages = np.zeros_like(k_pages)
    q = rng.standard_normal((B, H, Dh), np.float32)
    ctx_k = [rng.standard_normal((n, kvh, Dh), np.float32) for n in lengths]
    ctx_v = [rng.standard_normal((n, kvh, Dh), np.float32) for n in lengths]
    # every sequence's rows written in one scatter (one program per example, as the engine writes a
    # whole packed step's rows at once)
    slots = np.array([tables[b, j // page_size] * page_size + j % page_size
                      for b, n in enumerate(lengths) for j in range(n)])
    k_pages = np.array(write_jit(jnp.asarray(k_pages), jnp.asarray(slots), jnp.asarray(np.concatenate(ctx_k))))
    v_pages = np.array(write_jit(jnp.asarray(v_pages), jnp.asarray(slots), jnp.asarray(np.concatenate(ctx_v))))
    # Garbage in every slot no context wrote, including the tail of each sequence's last page and
    # the pages its table lists past its length (both are read and must be masked): a position the
    # kernel fails to mask then dominates the softmax (K) or the sum (V).
    written = np.zeros((num_pages, page_size), bool)
    for b, n in enumerate(lengths):
        for j in range(n):
            written[tables[b, j // page_size], j % page_size] = True
    assert (~written[tables]).any() or all(n == per_seq * page_size for n in lengths)
    k_pages[~written] = 1e3
    v_pages[~written] = 1e3
    out = np.asarray(
        paged_decode_jit(q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(tables),
                         jnp.asarray(np.array(lengths, np.int32)), 0.25)
    )
    for b, n in enumerate(lengths):
        # the decode query is the last position: dense causal's last row
        qq = np.concatenate([np.zeros((n - 1, H, Dh), np.float32), q[b : b + 1]])
        ref = dense_causal(qq, ctx_k[b], ctx_v[b], 0.25)[-1]
        np.testing.assert_allclose(out[b], ref, atol=1e-5)


def test_write_kv_slots_places_rows():
    pages = jnp.zeros((3, 4, 1, 2))
    new = jnp.arange(6, dtype=jnp.float32).reshape(3, 1, 2) + 1
    out = np.asarray(write_kv_slots(pages, jnp.asarray([5, 11, 0]), new))
    assert np.all(out[1, 1, 0] == [1, 2]) and np.all(out[2, 3, 0] == [3, 4]) and np.all(out[0, 0, 0] == [5, 6])
    assert np.count_nonzero(out) == 6
