"""Attention entry points, plain jnp: the reference every Pallas kernel is checked against.

Both take one layer's slice of the paged pool. The engine selects an implementation through
:class:`AttentionImpl`, a static (hashable) jit argument, so Pallas kernels plug in behind the same
signatures without touching the model code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

_NEG = -1e30


def packed_causal_attention(
    q: jax.Array,  # [T, H, Dh]
    k: jax.Array,  # [T, KVH, Dh]
    v: jax.Array,  # [T, KVH, Dh]
    segment_ids: jax.Array,  # [T] int32, -1 marks padding
    positions: jax.Array,  # [T] int32, position inside its own sequence
    scale: float,
) -> jax.Array:
    """Causal attention over several prompts packed into one token axis (no padding between them).

    A query attends to keys of its own segment at positions <= its own. Padding queries produce zeros.
    """
    T, H, Dh = q.shape
    KVH = k.shape[1]
    G = H // KVH
    qg = q.reshape(T, KVH, G, Dh)
    s = jnp.einsum("tkgd,skd->kgts", qg, k, preferred_element_type=jnp.float32) * scale
    same = segment_ids[:, None] == segment_ids[None, :]
    causal = positions[None, :] <= positions[:, None]
    valid = same & causal & (segment_ids[:, None] >= 0)
    s = jnp.where(valid[None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(valid[None, None], p, 0.0)
    o = jnp.einsum("kgts,skd->tkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(T, H, Dh).astype(q.dtype)


def paged_decode_attention(
    q: jax.Array,  # [B, H, Dh]
    k_pages: jax.Array,  # [P, page_size, KVH, Dh] (one layer of the pool)
    v_pages: jax.Array,  # [P, page_size, KVH, Dh]
    page_tables: jax.Array,  # [B, pages_per_seq] int32
    lengths: jax.Array,  # [B] int32, tokens in the cache for each sequence (new one included)
    scale: float,
) -> jax.Array:
    """One query token per sequence attending to its cached context through its page table."""
    B, H, Dh = q.shape
    _, ps, KVH, _ = k_pages.shape
    G = H // KVH
    S = page_tables.shape[1] * ps
    k = k_pages[page_tables].reshape(B, S, KVH, Dh)
    v = v_pages[page_tables].reshape(B, S, KVH, Dh)
    qg = q.reshape(B, KVH, G, Dh)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
    valid = jnp.arange(S)[None, :] < lengths[:, None]  # [B, S]
    s = jnp.where(valid[:, None, None, :], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(valid[:, None, None, :], p, 0.0)
    o = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(B, H, Dh).astype(q.dtype)


def paged_prefix_attention(
    q: jax.Array,  # [T, H, Dh]
    k_pages: jax.Array,  # [P, page_size, KVH, Dh] (one layer; this step's K/V already written)
    v_pages: jax.Array,
    page_tables: jax.Array,  # [S, pages_per_seq] int32, one row per segment
    segment_ids: jax.Array,  # [T] int32, row of page_tables; -1 marks padding
    positions: jax.Array,  # [T] int32, absolute position in its sequence
    scale: float,
) -> jax.Array:
    """Packed queries attending to their sequence's cached prefix *and* to themselves, through the pool.

    This is what a chunked-prefill step needs (a chunk continues a prompt whose earlier chunks are
    cached) and it also covers decode tokens (a segment of length 1); the caller writes the step's
    K/V into the pool first.
    """
    T, H, Dh = q.shape
    _, ps, KVH, _ = k_pages.shape
    G = H // KVH
    seq_tables = page_tables[jnp.maximum(segment_ids, 0)]  # [T, W]
    S = seq_tables.shape[1] * ps
    k = k_pages[seq_tables].reshape(T, S, KVH, Dh)
    v = v_pages[seq_tables].reshape(T, S, KVH, Dh)
    qg = q.reshape(T, KVH, G, Dh)
    s = jnp.einsum("tkgd,tskd->tkgs", qg, k, preferred_element_type=jnp.float32) * scale
    valid = (jnp.arange(S)[None, :] <= positions[:, None]) & (segment_ids[:, None] >= 0)  # [T, S]
    s = jnp.where(valid[:, None, None, :], s, _NEG)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(valid[:, None, None, :], p, 0.0)
    o = jnp.einsum("tkgs,tskd->tkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o.reshape(T, H, Dh).astype(q.dtype)


def write_kv_slots(pages: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Scatter new K or V rows ([T, KVH, Dh]) into one layer's pages at flat slot ids (page*ps + offset)."""
    P, ps = pages.shape[:2]
    return pages.at[slots // ps, slots % ps].set(new.astype(pages.dtype))


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """The operations the model needs from an attention backend (hashable: a static jit arg)."""

    name: str
    prefill: Callable[..., jax.Array] = packed_causal_attention
    decode: Callable[..., jax.Array] = paged_decode_attention
    mixed: Callable[..., jax.Array] = paged_prefix_attention
    write: Callable[..., jax.Array] = write_kv_slots


REFERENCE = AttentionImpl("reference")
