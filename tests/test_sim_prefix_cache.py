"""The simulator's model of prefix caching: the engine's allocator and schedulers, so a prompt over
cached pages prefills only the rest (as a mixed step over the cached prefix), pages are registered
after each prefill and evicted by the same LRU."""

from __future__ import annotations

import pytest

from distllm_jax.placement.latency import Fit, Profile
from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.simulator import SimConfig, SimRequest, Simulator
from distllm_jax.scheduling.prefix_cache import page_hashes

PS = 16


def profile() -> Profile:
    # prefill 1 ms + 0.01 ms a token; decode 5 ms + 1e-4 ms a context token
    fit = Fit((1.0, 0.01, 0.0), (5.0, 1e-4, 0.0), (5.0, 1e-4, 0.0))
    return Profile("toy", "toy", {1: fit}, params_bytes=1e9, kv_bytes_per_token=1e3, gpu_memory_bytes=80e9,
                   num_layers=8)


def turns(n: int = 3, first: int = 200, more: int = 40) -> list[list[int]]:
    """One conversation's prompts: each the one before, a 20-token reply and ``more`` new tokens."""
    out, tokens = [], list(range(first))
    for t in range(n):
        out.append(list(tokens))
        tokens += [1000 + 60 * t + k for k in range(20 + more)]
    return out


def _run(mode: str, cache: bool, kv_tokens: int = 100_000) -> tuple[list[SimRequest], Simulator]:
    prompts = turns()
    cfg = SimConfig(mode, prefill=(InstanceSpec(),), decode=(InstanceSpec(),), colocated=(InstanceSpec(),),
                    transfer_gbps=0, prefill_token_budget=512, kv_tokens=kv_tokens, prefix_cache=cache)
    reqs = [SimRequest(10.0 * k, len(p), 20, prefix_hashes=tuple(page_hashes(p, PS, "toy"))) for k, p in enumerate(prompts)]
    sim = Simulator(profile(), cfg)
    return sim.run(reqs), sim


@pytest.mark.parametrize("mode", ["colocated", "disaggregated", "chunked"])
def test_later_turns_prefill_only_what_is_not_cached(mode):
    on, sim = _run(mode, True)
    off, _ = _run(mode, False)
    prompts = turns()
    # turn k starts from the full pages of turn k-1's prompt (its replies' pages are not prompt pages)
    cached = [0] + [(len(prompts[k - 1]) // PS) * PS for k in (1, 2)]
    assert [r.cached_prompt_tokens for r in on] == cached
    prompt_side = [kv for kv in sim.kv if kv.inst.role != "decode"]
    assert sum(kv.cached_tokens for kv in prompt_side) == sum(cached)
    assert sum(kv.prompt_tokens for kv in prompt_side) == sum(map(len, prompts))
    assert on[0].ttft == pytest.approx(off[0].ttft)
    assert all(a.ttft < b.ttft for a, b in zip(on[1:], off[1:]))
    assert all(r.finish < float("inf") for r in on)


def test_a_pool_too_small_to_keep_the_pages_evicts_them():
    """Two conversations on a 20-page pool: the second one's first turn (14 pages) takes back the
    tail of the first one's 12 cached pages, so its next turn finds only their head."""
    a, b = turns(2), [[5000 + k for k in range(200)]]
    cfg = SimConfig("colocated", colocated=(InstanceSpec(),), prefill_token_budget=512, kv_tokens=20 * PS,
                    prefix_cache=True)
    reqs = [SimRequest(10.0 * k, len(p), 20, prefix_hashes=tuple(page_hashes(p, PS, "toy")))
            for k, p in enumerate([a[0], b[0], a[1]])]
    sim = Simulator(profile(), cfg)
    done = sim.run(reqs)
    assert all(r.finish < float("inf") for r in done)
    assert sim.kv[0].inst.alloc.evictions > 0
    assert 0 < done[2].cached_prompt_tokens < (len(a[0]) // PS) * PS


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_a_closed_loop_chat_reuses_its_replies_pages(mode):
    """``follow`` sends each next turn 0.5 s after the reply it answers; hashes over prompt and reply
    let a colocated instance start the next turn after the reply's full pages too (what it decoded
    there), a prefill instance after the prompt's alone."""
    reply, more, n_turns = 20, 40, 3
    tokens = {0: list(range(200))}  # each turn's whole sequence: its prompt, then its reply's ids

    def request(k: int, arrival: float) -> SimRequest:
        prompt = tokens[k]
        tokens[k] = prompt + [7000 + 100 * k + i for i in range(reply)]
        r = SimRequest(arrival, len(prompt), reply, prefix_hashes=tuple(page_hashes(tokens[k], PS, "toy")))
        r.rid = f"turn{k}"
        return r

    def follow(r: SimRequest) -> SimRequest | None:
        k = int(r.rid[4:]) + 1
        if k == n_turns:
            return None
        tokens[k] = tokens[k - 1] + [9000 + 100 * k + i for i in range(more)]
        return request(k, r.finish + 0.5)

    cfg = SimConfig(mode, prefill=(InstanceSpec(),), decode=(InstanceSpec(),), colocated=(InstanceSpec(),),
                    transfer_gbps=0, prefill_token_budget=512, kv_tokens=100_000, prefix_cache=True)
    done = Simulator(profile(), cfg).run([request(0, 0.0)], follow)
    assert [r.rid for r in done] == ["turn0", "turn1", "turn2"]
    assert all(b.arrival == pytest.approx(a.finish + 0.5) for a, b in zip(done, done[1:]))
    computed = [r.prompt_len + (reply - 1 if mode == "colocated" else 0) for r in done]
    assert [r.cached_prompt_tokens for r in done] == [0] + [(c // PS) * PS for c in computed[:-1]]
