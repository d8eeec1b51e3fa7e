"""KV migration between instances: the decode side *pulls* a finished prefill's pages.

In one process the pull is three steps, each a compiled program or a runtime copy:
gather the request's pages on the prefill mesh into one contiguous buffer, ``jax.device_put`` it onto
the decode mesh's pool sharding (which reshards when the tensor-parallel degrees differ), and scatter
it into the decode pool (donated, so the update is in place). Page counts are bucketed (padding reads
and writes the null page), so the set of compiled programs stays bounded.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from distllm_jax.kv_cache import NULL_PAGE, KVPool


def gather_pages(pool: KVPool, pages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[layers, n, page_size, kv_heads, head_dim] buffers holding the listed pages, in order."""
    return pool.k[:, pages], pool.v[:, pages]


def scatter_pages(pool: KVPool, pages: jax.Array, k: jax.Array, v: jax.Array) -> KVPool:
    return KVPool(pool.k.at[:, pages].set(k), pool.v.at[:, pages].set(v))


def page_buckets(max_pages: int) -> list[int]:
    """Powers of two up to (and including) a bucket that covers ``max_pages``."""
    out, b = [], 1
    while b < max_pages:
        out.append(b)
        b *= 2
    out.append(b)
    return out


class LocalKVPuller:
    """Pulls pages from one instance's pool into another's, both in this process.

    ``src_sharding`` / ``dst_sharding`` are the pools' shardings (on disjoint meshes, possibly with
    different tensor-parallel degrees).
    """

    def __init__(self, src_sharding: NamedSharding, dst_sharding: NamedSharding, max_pages: int):
        self.dst_sharding = dst_sharding
        self.buckets = page_buckets(max_pages)
        self._gather = jax.jit(gather_pages, out_shardings=(src_sharding, src_sharding))
        self._scatter = jax.jit(
            scatter_pages, donate_argnums=(0,), out_shardings=KVPool(dst_sharding, dst_sharding)
        )

    def bucket(self, n: int) -> int:
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets):
            raise ValueError(f"{n} pages exceed the largest transfer bucket {self.buckets[-1]}")
        return self.buckets[i]

    def _padded(self, pages: Sequence[int], size: int, sharding: NamedSharding) -> jax.Array:
        idx = np.full(size, NULL_PAGE, np.int32)
        idx[: len(pages)] = pages
        return jax.device_put(idx, NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))

    def pull(
        self,
        src_pool: KVPool,
        src_pages: Sequence[int],
        dst_pool: KVPool,
        dst_pages: Sequence[int],
    ) -> KVPool:
        """Copy ``src_pages`` of ``src_pool`` into ``dst_pages`` of ``dst_pool``; returns the new
        destination pool (the old one is donated and must not be used again)."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"page counts differ: {len(src_pages)} source, {len(dst_pages)} destination")
        size = self.bucket(len(src_pages))
        src_sharding = src_pool.k.sharding
        k, v = self._gather(src_pool, self._padded(src_pages, size, src_sharding))
        k, v = jax.device_put((k, v), self.dst_sharding)
        return self._scatter(dst_pool, self._padded(dst_pages, size, self.dst_sharding), k, v)


def pages_equal(a: KVPool, a_pages: Sequence[int], b: KVPool, b_pages: Sequence[int]) -> bool:
    """Bit-for-bit comparison of two requests' pages (a test and debugging aid)."""
    ia, ib = jnp.asarray(a_pages), jnp.asarray(b_pages)
    for x, y in ((a.k, b.k), (a.v, b.v)):
        xa, yb = np.asarray(x[:, ia]), np.asarray(y[:, ib])
        if xa.dtype != yb.dtype or xa.tobytes() != yb.tobytes():
            return False
    return True
