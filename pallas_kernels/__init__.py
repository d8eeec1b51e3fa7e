"""Pallas kernels for the engine's attention: paged decode attention and packed causal prefill
attention (one file a kernel). :func:`pallas_attention` bundles them as the engine's
:class:`~distllm_jax.models.attention.AttentionImpl`; on a CPU they run in interpret mode (tests)."""

from __future__ import annotations

import functools

import jax

from pallas_kernels.packed_prefill_attention import packed_prefill_attention
from pallas_kernels.paged_decode_attention import paged_decode_attention

__all__ = ["packed_prefill_attention", "paged_decode_attention", "pallas_attention"]


@functools.lru_cache(maxsize=None)
def pallas_attention(interpret: bool | None = None):
    """The engine's attention with the Pallas kernels (KV writes and chunked-prefill attention stay on
    XLA). One object per flavour, so it hashes the same in every jit cache key."""
    from distllm_jax.models.attention import AttentionImpl

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return AttentionImpl(
        "pallas-interpret" if interpret else "pallas",
        prefill=functools.partial(_prefill, interpret=interpret),
        decode=functools.partial(_decode, interpret=interpret),
    )


def _triton_ok(head_dim: int, interpret: bool) -> bool:
    """Pallas' Triton lowering takes power-of-two shapes only: other head sizes (e.g. 80) use XLA."""
    return interpret or head_dim & (head_dim - 1) == 0


def _prefill(q, k, v, segment_ids, positions, scale, *, interpret):
    if not _triton_ok(q.shape[-1], interpret):
        from distllm_jax.models.attention import packed_causal_attention

        return packed_causal_attention(q, k, v, segment_ids, positions, scale)
    return packed_prefill_attention(q, k, v, segment_ids, positions, scale, interpret=interpret)


def _decode(q, k_pages, v_pages, page_tables, lengths, scale, *, interpret):
    if not _triton_ok(q.shape[-1], interpret):
        from distllm_jax.models.attention import paged_decode_attention as xla_decode

        return xla_decode(q, k_pages, v_pages, page_tables, lengths, scale)
    return paged_decode_attention(q, k_pages, v_pages, page_tables, lengths, scale, interpret=interpret)
