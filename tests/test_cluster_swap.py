"""Preemption by swap in cluster mode: the decode instance is a Ray actor, so its swapped-out pages
are copied to host memory in the actor's own process and back. A burst whose worst case overflows
the decode pool three times completes with transformers' greedy tokens, every request is pulled
from prefill and checked page for page, and nothing is left in the pool or in host memory."""

from __future__ import annotations

import functools

import pytest

from distllm_jax.cluster import ClusterConfig, ClusterEngine
from distllm_jax.engine import FinishReason, InstanceSpec
from cluster_fixtures import local_ray
from engine_workload import BURST_POOL, greedy, hf_greedy, overflowing_burst, small_config

pytestmark = pytest.mark.timeout(1800)  # a backstop for a hung Ray call; the waits below are bounded

VARIANT = "opt-pre-ln"
WORK = overflowing_burst()


@pytest.mark.slow
def test_swap_preemption_in_a_decode_actor(converted):
    model, ckpt = converted(VARIANT)
    reference = functools.cache(lambda i: hf_greedy(model, *WORK[i]))
    cfg = small_config(prefill=(InstanceSpec(1),), decode=(InstanceSpec(1, num_pages=BURST_POOL),),
                       preemption="swap")
    with local_ray():
        engine = ClusterEngine(ckpt, cfg, ClusterConfig(address="auto"))
        try:
            streams = [engine.submit(p, greedy(n)) for p, n in WORK]
            assert engine.wait_idle(120 + 5 * engine.warmup_seconds), engine.stats()
            outs = [s.result() for s in streams]
            for i, out in enumerate(outs):
                assert out.error is None and out.finished is FinishReason.LENGTH, (i, out.error)
                assert out.token_ids == reference(i), f"request {i}"
            stats = {s["name"]: s for s in engine.stats()["instances"]}
            decode = [s for s in stats.values() if s["role"] == "decode"]
            assert sum(s["preemptions"]["swap"] for s in decode) > 0, stats
            assert all(s["preemptions"]["recompute"] == 0 and s["swapped"] == 0 for s in stats.values())
            engine.assert_no_leaks()
            assert all(inst.swapped_bytes() == 0 for inst in engine.instances)
        finally:
            engine.shutdown(drain=False)
