"""KV pull between instances on disjoint meshes: bit-exact pages (also across pipeline stages and
tensor degrees), and decoding continues on the decode mesh to the single-device reference tokens."""

from __future__ import annotations

import jax
import pytest

from distllm_jax.checkpoint import restore_params
from distllm_jax.engine import CheckpointSource, EngineConfig, InstanceSpec, SamplingParams
from distllm_jax.engine.instance import Instance, layer_split
from distllm_jax.engine.programs import Segment
from distllm_jax.engine.transfer import LocalKVPuller, page_buckets, pages_equal
from distllm_jax.models.attention import REFERENCE
from model_runner import greedy_generate

PROMPTS = [[5, 9, 23, 7, 1, 100, 42, 17, 250, 3, 66], [3, 4], [77, 12, 15, 19, 21, 2, 8, 9, 11, 200, 201]]
PAGE = 4
N_NEW = 8
GREEDY = SamplingParams(max_tokens=N_NEW)


@pytest.mark.parametrize(
    "variant,src,dst",
    [
        ("opt-pre-ln", InstanceSpec(tp=2), InstanceSpec(tp=4)),
        ("llama-gqa-llama3", InstanceSpec(tp=1, pp=2), InstanceSpec(tp=2)),
        ("opt-post-ln-proj", InstanceSpec(tp=4), InstanceSpec(tp=1, pp=2)),
    ],
)
def test_pull_across_meshes(converted, variant, src, dst):
    _, ckpt = converted(variant)
    source = CheckpointSource(ckpt)
    ecfg = EngineConfig(page_size=PAGE, num_pages=48, max_seq_len=64, max_decode_batch=4, progress=False)
    devs = jax.devices()
    p = Instance("p", "prefill", src, devs[: src.num_devices], source, ecfg, REFERENCE)
    d = Instance("d", "decode", dst, devs[src.num_devices : src.num_devices + dst.num_devices], source, ecfg,
                 REFERENCE)
    d.alloc.ensure("someone-else", 13)  # page ids on the two sides differ

    segs = [Segment(pr, 0, p.alloc.ensure(i, len(pr)), GREEDY, 0) for i, pr in enumerate(PROMPTS)]
    first = p.run("prefill", [segs])[0].ids[: len(PROMPTS)]

    puller = LocalKVPuller(max_pages=16)
    shardings = [st.pool.k[0].sharding for st in d.stages]
    for i, pr in enumerate(PROMPTS):
        dst_pages = list(d.alloc.ensure(i, len(pr) + N_NEW))[: len(p.alloc.table(i))]
        puller.pull(p, p.alloc.table(i), d, dst_pages)
        assert [st.pool.k[0].sharding for st in d.stages] == shardings
        assert pages_equal(p, p.alloc.table(i), d, dst_pages), "KV changed in transit"
        p.alloc.free(i)  # the prefill side lets go once pulled
    p.alloc.assert_no_leaks()

    out = [[int(t)] for t in first]
    for step in range(N_NEW - 1):
        segs = [Segment([o[-1]], len(pr) + step, d.alloc.table(i), GREEDY, 0)
                for i, (pr, o) in enumerate(zip(PROMPTS, out))]
        for o, t in zip(out, d.run("decode", [segs])[0].ids):
            o.append(int(t))
    cfg, ref_params = restore_params(ckpt)
    assert out == greedy_generate(ref_params, cfg, PROMPTS, N_NEW)
    for r in list(d.alloc.requests()):
        d.alloc.free(r)
    d.alloc.assert_no_leaks()


def test_buckets_bound_programs():
    assert page_buckets(1) == [1]
    assert page_buckets(9) == [1, 2, 4, 8, 16]


def test_layer_split():
    assert layer_split(5, 2) == [(0, 3), (3, 5)]
    assert layer_split(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError):
        layer_split(2, 3)
