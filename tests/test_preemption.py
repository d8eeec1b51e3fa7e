"""KV pages on demand with preemption, through the engine: a burst whose worst case overflows the
pool more than three times completes with `transformers`' greedy tokens in every mode and layout and
with both preemption kinds, seeded samples come out as they do without any preemption, and no page
or host copy is left behind."""

from __future__ import annotations

import functools

import pytest

from distllm_jax.engine import Engine, FinishReason, InstanceSpec, SamplingParams, compile_counter
from distllm_jax.kv_cache import pages_for
from engine_workload import BURST_POOL, MAX_LEN, PAGE, greedy, hf_greedy, overflowing_burst, small_config

VARIANT = "opt-pre-ln"
POOL = BURST_POOL
WORK = overflowing_burst()

LAYOUTS = {
    "disaggregated": dict(mode="disaggregated", prefill=(InstanceSpec(1, num_pages=POOL),),
                          decode=(InstanceSpec(2, num_pages=POOL),)),
    "disaggregated-pp2": dict(mode="disaggregated", prefill=(InstanceSpec(1, num_pages=POOL),),
                              decode=(InstanceSpec(1, 2, num_pages=POOL),)),
    "colocated": dict(mode="colocated", colocated=(InstanceSpec(1, num_pages=POOL),)),
    "colocated-pp2": dict(mode="colocated", colocated=(InstanceSpec(1, 2, num_pages=POOL),)),
    "chunked": dict(mode="chunked", colocated=(InstanceSpec(1, num_pages=POOL),), prefill_token_budget=16),
}


def test_the_burst_overflows_the_pool_three_times():
    worst = sum(pages_for(len(p) + n - 1, PAGE) for p, n in WORK)
    assert worst > 3 * (POOL - 1) and all(len(p) + n <= MAX_LEN for p, n in WORK)


@pytest.fixture(scope="module")
def reference(converted):
    model = converted(VARIANT)[0]
    return functools.cache(lambda i: hf_greedy(model, *WORK[i]))


@pytest.mark.slow
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_an_overflowing_burst_gives_greedy_tokens(converted, reference, layout, preemption):
    engine = Engine(converted(VARIANT)[1], small_config(**LAYOUTS[layout], preemption=preemption))
    try:
        compiled = compile_counter.compilations()
        streams = [engine.submit(p, greedy(n)) for p, n in WORK]  # all at once
        outs = [s.result() for s in streams]
        assert compile_counter.compilations() == compiled  # growth writes table entries; swaps were warmed
        for i, out in enumerate(outs):
            assert out.error is None and out.finished is FinishReason.LENGTH
            assert out.token_ids == reference(i), f"request {i}"  # streamed once each, none twice
        assert engine.wait_idle(20)
        stats = engine.stats()["instances"]
        assert sum(s["preemptions"][preemption] for s in stats) > 0, stats
        assert all(s["preemptions"][k] == 0 for s in stats for k in s["preemptions"] if k != preemption)
        assert all(s["swapped"] == 0 and s["pages_reserved"] == 0 for s in stats)
        engine.assert_no_leaks()
        assert all(inst.swapped_bytes() == 0 for inst in engine.instances)
    finally:
        engine.shutdown(drain=False)


@pytest.mark.slow
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_seeded_samples_are_those_of_a_run_without_preemption(converted, preemption):
    """A recompute samples its next token from a prefill, a swap-in from the decode step: both draw
    it with the random stream of its position, so the tokens are those an unpreempted run draws."""
    ckpt = converted(VARIANT)[1]
    params = [SamplingParams(max_tokens=n, temperature=1.0, top_p=0.9, seed=i, n=2, ignore_eos=True)
              for i, (_, n) in enumerate(WORK)]
    outs = {}
    for name, pages in (("roomy", 400), ("tight", POOL)):
        cfg = small_config(mode="colocated", colocated=(InstanceSpec(1, num_pages=pages),), preemption=preemption)
        engine = Engine(ckpt, cfg)
        try:
            streams = [engine.submit(p, sp) for (p, _), sp in zip(WORK, params)]
            outs[name] = [[o.token_ids for o in s.results()] for s in streams]
            preempted = sum(s["preemptions"][preemption] for s in engine.stats()["instances"])
            assert engine.wait_idle(20)
            engine.assert_no_leaks()
        finally:
            engine.shutdown(drain=False)
        assert (preempted > 0) == (name == "tight")
    assert outs["tight"] == outs["roomy"]


def test_reserve_admission_never_preempts(converted, reference):
    cfg = small_config(mode="colocated", colocated=(InstanceSpec(1, num_pages=POOL),), kv_admission="reserve")
    engine = Engine(converted(VARIANT)[1], cfg)
    try:
        outs = [s.result() for s in [engine.submit(p, greedy(n)) for p, n in WORK[:6]]]
        assert [o.token_ids for o in outs] == [reference(i) for i in range(6)]
        (inst,) = engine.stats()["instances"]
        assert inst["kv_admission"] == "reserve" and sum(inst["preemptions"].values()) == 0
    finally:
        engine.shutdown(drain=False)
