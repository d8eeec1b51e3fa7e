"""Pallas kernels for the engine's attention: paged decode attention, packed causal prefill attention
and paged prefill attention (packed chunks over their cached prefix), one file a kernel (``flash``:
the online-softmax step the prefill kernels share), each beside a pure-jnp reference in its tests.
They import nothing of the project: ``distllm_jax.models.pallas_attention`` bundles them as the
engine's attention backend; on a CPU they run in interpret mode (tests)."""

from __future__ import annotations

from pallas_kernels.packed_prefill_attention import packed_prefill_attention
from pallas_kernels.paged_decode_attention import paged_decode_attention
from pallas_kernels.paged_prefill_attention import paged_prefill_attention

__all__ = ["packed_prefill_attention", "paged_decode_attention", "paged_prefill_attention"]
