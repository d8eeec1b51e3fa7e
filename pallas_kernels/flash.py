"""The online-softmax (flash-attention) update the prefill kernels share, traced into each kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # a masked logit: exp2 of it underflows to 0, and it stays finite (no inf - inf)
LOG2E = 1.4426950408889634  # the kernels' softmax is in base 2: exp2 is the hardware's instruction


def online_softmax_init(rows: int, dh: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The running (output, max, sum) before any key block."""
    return jnp.zeros((rows, dh), jnp.float32), jnp.full((rows,), NEG, jnp.float32), jnp.zeros((rows,), jnp.float32)


def online_softmax_step(carry: tuple[jax.Array, jax.Array, jax.Array], logits: jax.Array, v: jax.Array,
                        ok: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fold one block of keys into the running (output, max, sum) of each query row.

    Args:
        carry: ``o [rows, Dh]`` float32 unnormalised output, ``m [rows]`` running max and ``l [rows]``
            running sum, both in base 2 (logits already times log2(e)).
        logits: ``[rows, keys]`` float32 this block's logits, base 2.
        v: ``[keys, Dh]`` this block's values.
        ok: ``[rows, keys]`` which keys each row may see; None: all. A row that sees none of them so
            far keeps m at NEG, where exp2(logit - m) = 1, so its p is zeroed explicitly.
    """
    o, m, l = carry
    if ok is not None:
        logits = jnp.where(ok, logits, NEG)
    m_new = jnp.maximum(m, logits.max(axis=-1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(logits - m_new[:, None])
    if ok is not None:
        p = jnp.where(ok, p, 0.0)
    l_new = alpha * l + p.sum(axis=-1)
    o_new = alpha[:, None] * o + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o_new, m_new, l_new
