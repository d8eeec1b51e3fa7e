"""The engine's attention backend on the Pallas kernels (``pallas_kernels``), with the XLA reference
where a kernel cannot take the shape (KV writes stay on XLA)."""

from __future__ import annotations

import functools

import jax

from distllm_jax.models import attention
from pallas_kernels import packed_prefill_attention, paged_decode_attention, paged_prefill_attention


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
    """A chunked-prefill step (prompt chunks and decode tokens packed together, the step's K/V already
    in the pool): the paged prefill kernel reads each sequence's pages once per block of its query
    tokens, up to the block's highest position. The XLA reference gathers the table's whole width for
    every token, which at a 2048-token budget and context is tens of GB a layer."""
    if not _triton_ok(q.shape[-1], interpret):
        return attention.paged_prefix_attention(q, k_pages, v_pages, page_tables, segment_ids, positions, scale)
    return paged_prefill_attention(q, k_pages, v_pages, page_tables, segment_ids, positions, scale,
                                   interpret=interpret)
