"""Pallas kernels for the engine's attention: paged decode attention and packed causal prefill
attention (one file a kernel, each beside a pure-jnp reference in its tests). They import nothing of
the project: ``distllm_jax.models.pallas_attention`` bundles them as the engine's attention backend;
on a CPU they run in interpret mode (tests)."""

from __future__ import annotations

from pallas_kernels.packed_prefill_attention import packed_prefill_attention
from pallas_kernels.paged_decode_attention import paged_decode_attention

__all__ = ["packed_prefill_attention", "paged_decode_attention"]
