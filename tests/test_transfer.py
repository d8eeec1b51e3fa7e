"""KV pull between disjoint meshes: bit-exact pages, and decoding continues to the reference tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distllm_jax.checkpoint import restore_params
from distllm_jax.engine.transfer import LocalKVPuller, page_buckets, pages_equal
from distllm_jax.kv_cache import PageAllocator, create_pool
from distllm_jax.models import DecodeBatch
from distllm_jax.parallel import kv_pool_sharding, make_mesh, split_devices
from model_runner import DECODE, PREFILL, greedy_generate, pack_prompts

PROMPTS = [[5, 9, 23, 7, 1, 100, 42, 17, 250, 3, 66], [3, 4], [77, 12, 15, 19, 21, 2, 8, 9, 11, 200, 201]]
PAGE = 4
N_NEW = 8


@pytest.mark.parametrize(
    "variant,p_tp,d_tp", [("opt-pre-ln", 2, 4), ("llama-gqa-llama3", 1, 2), ("opt-post-ln-proj", 4, 1)]
)
def test_pull_across_meshes(converted, variant, p_tp, d_tp):
    _, ckpt = converted(variant)
    p_devs, d_devs = split_devices([p_tp, d_tp])
    p_mesh, d_mesh = make_mesh(p_devs), make_mesh(d_devs)
    cfg, p_params = restore_params(ckpt, mesh=p_mesh)
    _, d_params = restore_params(ckpt, mesh=d_mesh)
    p_sh, d_sh = kv_pool_sharding(cfg, p_mesh), kv_pool_sharding(cfg, d_mesh)

    # prefill instance: its own pool and allocator
    p_alloc = PageAllocator(32, PAGE)
    p_pool = create_pool(cfg, 32, PAGE, sharding=p_sh)
    tables = [p_alloc.ensure(i, len(p)) for i, p in enumerate(PROMPTS)]
    width = max(map(len, tables))
    padded = np.array([t + [0] * (width - len(t)) for t in tables], np.int32)
    logits, p_pool = PREFILL(p_params, cfg, pack_prompts(PROMPTS, padded, PAGE), p_pool)
    first = np.asarray(logits).argmax(-1)

    # decode instance: a pool with some pages already taken, so page ids differ from the source
    d_alloc = PageAllocator(48, PAGE)
    d_alloc.ensure("someone-else", 13)
    d_pool = create_pool(cfg, 48, PAGE, sharding=d_sh)
    puller = LocalKVPuller(p_sh, d_sh, max_pages=16)
    d_tables = []
    for i, p in enumerate(PROMPTS):
        dst = list(d_alloc.ensure(i, len(p)))
        d_pool = puller.pull(p_pool, tables[i], d_pool, dst)
        assert d_pool.k.sharding == d_sh
        assert pages_equal(p_pool, tables[i], d_pool, dst), "KV changed in transit"
        p_alloc.free(i)  # the prefill side lets go once pulled
        d_tables.append(dst)
    p_alloc.assert_no_leaks()

    # continue decoding on the decode mesh; tokens match a single-device run
    per_seq = -(-(max(map(len, PROMPTS)) + N_NEW) // PAGE)
    out = [[int(t)] for t in first]
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    for _ in range(N_NEW - 1):
        tbl = np.zeros((len(PROMPTS), per_seq), np.int32)
        for i in range(len(PROMPTS)):
            t = d_alloc.ensure(i, int(lengths[i]) + 1)
            tbl[i, : len(t)] = t
        step, d_pool = DECODE(d_params, cfg, DecodeBatch(jnp.asarray([o[-1] for o in out], jnp.int32),
                                                          jnp.asarray(lengths), jnp.asarray(tbl)), d_pool)
        for o, t in zip(out, np.asarray(step).argmax(-1)):
            o.append(int(t))
        lengths += 1
    _, ref_params = restore_params(ckpt)
    assert out == greedy_generate(ref_params, cfg, PROMPTS, N_NEW)
    for r in list(d_alloc.requests()):
        d_alloc.free(r)
    d_alloc.assert_no_leaks()


def test_buckets_bound_programs():
    assert page_buckets(1) == [1]
    assert page_buckets(9) == [1, 2, 4, 8, 16]
    mesh = make_mesh(jax.devices()[:1])
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    puller = LocalKVPuller(sh, sh, max_pages=8)
    assert puller.bucket(3) == 4 and puller.bucket(8) == 8
    with pytest.raises(ValueError, match="exceed"):
        puller.bucket(9)
    with pytest.raises(ValueError, match="page counts differ"):
        puller.pull(None, [1, 2], None, [3])
