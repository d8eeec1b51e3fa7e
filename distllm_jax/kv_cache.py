"""The paged KV pool: device arrays whose shape never changes while serving.

Layout ``[layers, pages, page_size, kv_heads, head_dim]`` for K and for V. Page 0 is reserved as the
*null page*: padding tokens of a bucketed batch write there and padded page-table entries point there,
so every jitted program can run at a fixed shape without masking its writes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from distllm_jax.models.config import ModelConfig

NULL_PAGE = 0


class KVPool(NamedTuple):
    k: jax.Array
    v: jax.Array

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)


def pool_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any) -> int:
    n = 1
    for d in pool_shape(cfg, num_pages, page_size):
        n *= d
    return 2 * n * jnp.dtype(dtype).itemsize


def create_pool(
    cfg: ModelConfig,
    num_pages: int,
    page_size: int = 16,
    dtype: Any = jnp.float32,
    sharding: jax.sharding.Sharding | None = None,
) -> KVPool:
    """Zero-filled pool, allocated directly with its sharding (no host copy)."""
    shape = pool_shape(cfg, num_pages, page_size)
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KVPool(make(), make())
