"""The engine's attention backend on the Pallas kernels (``pallas_kernels``), with the XLA reference
where a kernel cannot take the shape (KV writes stay on XLA)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distllm_jax.models import attention
from pallas_kernels import packed_prefill_attention, paged_decode_attention


@functools.lru_cache(maxsize=None)
def pallas_attention(interpret: bool | None = None):
    """The engine's attention with the Pallas kernels (KV writes stay on XLA). One object per
    flavour, so it hashes the same in every jit cache key."""
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return attention.AttentionImpl(
        "pallas-interpret" if interpret else "pallas",
        prefill=functools.partial(_prefill, interpret=interpret),
        decode=functools.partial(_decode, interpret=interpret),
        mixed=functools.partial(_mixed, interpret=interpret),
    )


def _triton_ok(head_dim: int, interpret: bool) -> bool:
    """Pallas' Triton lowering takes power-of-two shapes only: other head sizes (e.g. 80) use XLA."""
    return interpret or head_dim & (head_dim - 1) == 0


def _prefill(q, k, v, segment_ids, positions, scale, *, interpret):
    if not _triton_ok(q.shape[-1], interpret):
        return attention.packed_causal_attention(q, k, v, segment_ids, positions, scale)
    return packed_prefill_attention(q, k, v, segment_ids, positions, scale, interpret=interpret)


def _decode(q, k_pages, v_pages, page_tables, lengths, scale, *, interpret):
    if not _triton_ok(q.shape[-1], interpret):
        return attention.paged_decode_attention(q, k_pages, v_pages, page_tables, lengths, scale)
    return paged_decode_attention(q, k_pages, v_pages, page_tables, lengths, scale, interpret=interpret)


def _mixed(q, k_pages, v_pages, page_tables, segment_ids, positions, scale, *, interpret):
    """A chunked-prefill step (prompt chunks and decode tokens packed together): every token is one
    row of the paged decode kernel, reading its own sequence's pages up to its own position, which is
    causal attention over the cached prefix and the chunk itself (the step's K/V are already in the
    pool). Work follows each token's real prefix; the XLA reference gathers the table's whole width for
    every token, which at a 2048-token budget and context is tens of GB a layer. Padding tokens get
    length 1 (finite reads of a real row); their outputs are ignored."""
    if not _triton_ok(q.shape[-1], interpret):
        return attention.paged_prefix_attention(q, k_pages, v_pages, page_tables, segment_ids, positions, scale)
    rows = page_tables[jnp.maximum(segment_ids, 0)]
    lengths = jnp.where(segment_ids >= 0, positions + 1, 1).astype(jnp.int32)
    return paged_decode_attention(q, k_pages, v_pages, rows, lengths, scale, interpret=interpret)
