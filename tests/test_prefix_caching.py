"""Prefix caching through the engine: prompts that begin with pages an earlier prompt left cached
start their prefill after those pages, and the greedy tokens still equal `transformers'` in every
mode and layout, for prefixes that end mid-page, for a prompt sent twice (its last token is computed
again: its logits sample the first token), for n > 1 samples, for a chat's next turn over the
reply's pages, and when the pool fills and cached pages are evicted. Nothing leaks; cached pages stay matchable until evicted; serving compiles
nothing after start-up."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from distllm_jax.engine import Engine, FinishReason, InstanceSpec, SamplingParams, compile_counter
from engine_workload import PAGE, greedy, hf_greedy, small_config
from serve.metrics import EngineCollector

VARIANT = "opt-pre-ln"
RNG = np.random.default_rng(11)
BASE = [int(t) for t in RNG.integers(3, 250, 4 * PAGE + 1)]  # 4 full pages and one token more


def _tail(n: int) -> list[int]:
    return [int(t) for t in RNG.integers(3, 250, n)]


# (prompt, new tokens), sent one wave after another so each wave can hit the pages the one before left
WAVES = [
    [(BASE + _tail(3), 6)],
    [(BASE + _tail(5), 5), (BASE[:2 * PAGE + 2] + _tail(4), 4), (BASE + _tail(3)[:0], 3)],
    [(BASE[:4 * PAGE], 4), (BASE[:4 * PAGE], 4), (_tail(9), 4)],
]
ITEMS = [item for wave in WAVES for item in wave]

LAYOUTS = {
    "disaggregated": dict(mode="disaggregated", prefill=(InstanceSpec(1),), decode=(InstanceSpec(2),)),
    "disaggregated-pp2": dict(mode="disaggregated", prefill=(InstanceSpec(1, 2),), decode=(InstanceSpec(1),)),
    "colocated": dict(mode="colocated", colocated=(InstanceSpec(1),)),
    "colocated-tp2": dict(mode="colocated", colocated=(InstanceSpec(2),)),
    "chunked": dict(mode="chunked", colocated=(InstanceSpec(1),), prefill_token_budget=16),
}


@pytest.fixture(scope="module")
def reference(converted):
    model = converted(VARIANT)[0]
    return functools.cache(lambda p, n: hf_greedy(model, list(p), n))


def _prompt_side(engine: Engine) -> list[dict]:
    return [s for s in engine.stats()["instances"] if s["role"] != "decode"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_prefixes_give_greedy_tokens(converted, reference, layout):
    engine = Engine(converted(VARIANT)[1], small_config(**LAYOUTS[layout], prefix_cache=True))
    try:
        compiled = compile_counter.compilations()
        for wave in WAVES:
            outs = [s.result() for s in [engine.submit(p, greedy(n)) for p, n in wave]]
            for (p, n), out in zip(wave, outs):
                assert out.error is None and out.finished is FinishReason.LENGTH
                assert out.token_ids == reference(tuple(p), n)
        assert compile_counter.compilations() == compiled
        assert engine.wait_idle(20)
        side = _prompt_side(engine)
        hit = sum(s["prefix_hit_tokens"] for s in side)
        # wave 2: 4 pages, 2 pages and 4 pages; wave 3: 3 pages for each copy of the 4-page prompt
        # (its last page holds the token that samples; the second copy may run beside the first)
        assert hit >= (4 + 2 + 4 + 3) * PAGE, side
        assert sum(s["prompt_tokens"] for s in side) == sum(len(p) for p, _ in ITEMS)
        assert all(s["pages_cached"] > 0 for s in side)
        engine.assert_no_leaks()
    finally:
        engine.shutdown(drain=False)


@pytest.mark.slow
def test_samples_and_eviction_with_a_small_pool(converted, reference):
    """n = 2 samples start from cached pages too (sharing them), and a pool too small to keep
    every prompt's pages evicts the oldest released ones; tokens stay exact throughout."""
    engine = Engine(converted(VARIANT)[1], small_config(mode="colocated", colocated=(InstanceSpec(1, num_pages=33),),
                                                        prefix_cache=True))
    try:
        sp = SamplingParams(max_tokens=4, temperature=0.0, n=2, ignore_eos=True)
        first = engine.submit(BASE + [7], sp).results()
        again = engine.submit(BASE + [9], sp).results()
        for outs, p in ((first, BASE + [7]), (again, BASE + [9])):
            assert [o.token_ids for o in outs] == [reference(tuple(p), 4)] * 2
        (inst,) = engine.stats()["instances"]
        assert inst["prefix_hit_tokens"] == 4 * PAGE
        scraped = {m.name: m.samples[0].value for m in EngineCollector(engine.stats).collect()
                   if m.name.startswith(("distllm_prefix", "distllm_prompt_tokens", "distllm_kv_pages_cached"))}
        assert scraped == {"distllm_prompt_tokens": 2 * (4 * PAGE + 2), "distllm_prefix_cache_hit_tokens": 4 * PAGE,
                           "distllm_kv_pages_cached": inst["pages_cached"], "distllm_prefix_cache_evictions": 0}
        # distinct prompts until the cache gives pages back, then the base prefix is gone
        for _ in range(12):  # 3 cached pages each: 36 against 32 in the pool
            p = _tail(3 * PAGE + 1)
            assert engine.submit(p, greedy(3)).result().token_ids == reference(tuple(p), 3)
        (inst,) = engine.stats()["instances"]
        assert inst["prefix_evictions"] > 0
        p = BASE + [11]
        assert engine.submit(p, greedy(3)).result().token_ids == reference(tuple(p), 3)
        assert engine.wait_idle(20)
        engine.assert_no_leaks()
    finally:
        engine.shutdown(drain=False)


def test_prompt_logprobs_never_start_from_cached_pages(converted):
    engine = Engine(converted(VARIANT)[1], small_config(mode="colocated", colocated=(InstanceSpec(1),),
                                                        prefix_cache=True))
    try:
        p = BASE + [5]
        engine.submit(p, greedy(2)).result()
        out = engine.submit(p, SamplingParams(max_tokens=2, prompt_logprobs=0, ignore_eos=True)).result()
        assert len(out.prompt_logprobs) == len(p) and out.prompt_logprobs[0] is None
        assert all(lp is not None for lp in out.prompt_logprobs[1:])
        (inst,) = engine.stats()["instances"]
        assert inst["prefix_hit_tokens"] == 0
    finally:
        engine.shutdown(drain=False)


@pytest.mark.parametrize("layout", ["colocated", "chunked", "disaggregated"])
def test_a_chats_next_turn_starts_from_the_replys_pages(converted, reference, layout):
    """A finished request leaves the full pages of its prompt *and* its reply cached where it
    decoded, so the next turn (this prompt, the reply, a new message) starts after them; a decode
    instance caches nothing, so disaggregated the next turn starts from the prompt's pages alone."""
    engine = Engine(converted(VARIANT)[1], small_config(**LAYOUTS[layout], prefix_cache=True))
    try:
        first = BASE[:2 * PAGE + 3]
        reply = engine.submit(first, greedy(20)).result().token_ids
        assert reply == reference(tuple(first), 20)
        nxt = first + reply + _tail(5)
        assert engine.submit(nxt, greedy(4)).result().token_ids == reference(tuple(nxt), 4)
        # the prompt's full pages, or those of the prompt and the 19 reply tokens fed back
        want = (len(first) // PAGE if layout == "disaggregated" else (len(first) + 19) // PAGE) * PAGE
        assert sum(s["prefix_hit_tokens"] for s in _prompt_side(engine)) == want
        assert engine.wait_idle(20)
        engine.assert_no_leaks()
    finally:
        engine.shutdown(drain=False)


def _conversations(n: int, turns: int, seed: int = 3) -> list[list[list[int]]]:
    """Per conversation, each turn's new user tokens (a turn's prompt: all before it, the replies
    included, and these)."""
    rng = np.random.default_rng(seed)
    return [[[int(t) for t in rng.integers(3, 250, int(rng.integers(2 * PAGE, 3 * PAGE)))] for _ in range(turns)]
            for _ in range(n)]


@pytest.mark.slow
def test_routing_by_cached_prefix_beats_round_robin(converted, reference):
    """Two prefill instances, multi-turn conversations turn by turn: routed by cached prefix, every
    later turn goes where its conversation's pages are; round-robin, with an odd number of them,
    sends each conversation's next turn to the other instance."""
    convs = _conversations(3, 3)
    hits = {}
    for routing in ("prefix", "round-robin"):
        cfg = small_config(mode="disaggregated", prefill=(InstanceSpec(1), InstanceSpec(1)), decode=(InstanceSpec(1),),
                           prefix_cache=True, prefill_routing=routing)
        engine = Engine(converted(VARIANT)[1], cfg)
        try:
            prompts = [[] for _ in convs]
            for turn in range(3):
                for c, conv in enumerate(convs):
                    prompts[c] = prompts[c] + conv[turn]
                    out = engine.submit(prompts[c], greedy(3)).result()
                    assert out.token_ids == reference(tuple(prompts[c]), 3)
                    prompts[c] = prompts[c] + out.token_ids
            stats = engine.stats()
            assert stats["routing"]["policy"] == routing and sum(stats["routing"]["decisions"].values()) == 9
            hits[routing] = sum(s["prefix_hit_tokens"] for s in stats["instances"] if s["role"] == "prefill")
            if routing == "prefix":
                assert stats["routing"]["cache_routed"] == 6  # every later turn of every conversation
            assert engine.wait_idle(20)
            engine.assert_no_leaks()
        finally:
            engine.shutdown(drain=False)
    assert hits["prefix"] > hits["round-robin"], hits
