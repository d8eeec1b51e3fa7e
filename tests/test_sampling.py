"""On-device sampling: greedy, filters, and seeds that make a request's output independent of its batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distllm_jax.engine.sampling import SamplingParams, make_sampling_batch, sample

_sample = jax.jit(sample)


def _draw(logits, params, positions, pad_to=None):
    sb = make_sampling_batch(params, positions, [0] * len(params), pad_to or len(params))
    lg = np.zeros((sb.seed.shape[0], logits.shape[1]), np.float32)
    lg[: len(logits)] = logits
    return np.asarray(_sample(jnp.asarray(lg), sb))[: len(params)]


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 50)).astype(np.float32)
    out = _draw(logits, [SamplingParams()] * 5, [0] * 5)
    assert list(out) == list(logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 64)).astype(np.float32) * 3
    for sp in (SamplingParams(temperature=1.5, top_k=1, seed=3), SamplingParams(temperature=1.0, top_p=1e-6, seed=4)):
        assert list(_draw(logits, [sp] * 4, [7] * 4)) == list(logits.argmax(-1))


def test_top_k_restricts_support():
    logits = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (1, 1))
    seen = set()
    for pos in range(200):
        seen |= set(_draw(logits, [SamplingParams(temperature=5.0, top_k=3, seed=11)], [pos]).tolist())
    assert seen == {29, 30, 31}


def test_top_p_restricts_support():
    # probabilities 0.5, 0.3, 0.2 (and ~0 for the rest): top_p=0.7 keeps exactly the first two
    logits = np.full((1, 16), -1e9, np.float32)
    logits[0, :3] = np.log([0.5, 0.3, 0.2])
    seen = set()
    for pos in range(200):
        seen |= set(_draw(logits, [SamplingParams(temperature=1.0, top_p=0.7, seed=5)], [pos]).tolist())
    assert seen == {0, 1}


def test_temperature_sampling_matches_distribution():
    logits = np.log(np.array([[0.6, 0.3, 0.1]], np.float32))
    draws = [_draw(logits, [SamplingParams(temperature=1.0, seed=s)], [0])[0] for s in range(600)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.06)


def test_seed_makes_output_independent_of_batch():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 100)).astype(np.float32)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = _draw(logits[2:3], [sp], [17])[0]
    others = [SamplingParams(temperature=0.7, seed=i) for i in range(6)]
    others[2] = sp
    batched = _draw(logits, others, [17] * 6, pad_to=8)[2]
    assert alone == batched
    # a different position gives an independent draw stream
    draws = {int(_draw(logits[2:3], [sp], [p])[0]) for p in range(30)}
    assert len(draws) > 1


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                dict(max_tokens=0), dict(seed=-1)])
def test_invalid_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
