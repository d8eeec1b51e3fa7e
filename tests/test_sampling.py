"""On-device sampling: greedy, filters, and seeds that make a request's output independent of its batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distllm_jax.engine.sampling import SAMPLERS, SamplingParams, make_sampling_batch, sample, sampler_for

_sample = jax.jit(sample, static_argnames="method")
METHODS = sorted(SAMPLERS)  # every sampler is checked on the CPU, whichever a backend uses


def _draw(logits, params, positions, pad_to=None, method=None):
    sb = make_sampling_batch(params, positions, [0] * len(params), pad_to or len(params))
    lg = np.zeros((sb.seed.shape[0], logits.shape[1]), np.float32)
    lg[: len(logits)] = logits
    return np.asarray(_sample(jnp.asarray(lg), sb, method=method))[: len(params)]


def test_each_backend_has_a_sampler():
    assert sampler_for("gpu") == "threshold" and sampler_for("cpu") == "rejection"


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 50)).astype(np.float32)
    out = _draw(logits, [SamplingParams()] * 5, [0] * 5)
    assert list(out) == list(logits.argmax(-1))


@pytest.mark.parametrize("method", METHODS)
def test_top_k_1_and_tiny_top_p_are_greedy(method):
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((4, 64)).astype(np.float32) * 3
    for sp in (SamplingParams(temperature=1.5, top_k=1, seed=3), SamplingParams(temperature=1.0, top_p=1e-6, seed=4)):
        assert list(_draw(logits, [sp] * 4, [7] * 4, method=method)) == list(logits.argmax(-1))


@pytest.mark.parametrize("method", METHODS)
def test_top_k_restricts_support(method):
    logits = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (1, 1))
    seen = set()
    for pos in range(200):
        seen |= set(_draw(logits, [SamplingParams(temperature=5.0, top_k=3, seed=11)], [pos], method=method).tolist())
    assert seen == {29, 30, 31}


@pytest.mark.parametrize("method", METHODS)
def test_top_p_restricts_support(method):
    # probabilities 0.5, 0.3, 0.2 (and ~0 for the rest): top_p=0.7 keeps exactly the first two
    logits = np.full((1, 16), -1e9, np.float32)
    logits[0, :3] = np.log([0.5, 0.3, 0.2])
    seen = set()
    for pos in range(200):
        seen |= set(_draw(logits, [SamplingParams(temperature=1.0, top_p=0.7, seed=5)], [pos], method=method).tolist())
    assert seen == {0, 1}


@pytest.mark.parametrize("method", METHODS)
def test_temperature_sampling_matches_distribution(method):
    logits = np.log(np.array([[0.6, 0.3, 0.1]], np.float32))
    draws = [_draw(logits, [SamplingParams(temperature=1.0, seed=s)], [0], method=method)[0] for s in range(600)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.06)


@pytest.mark.parametrize("method", METHODS)
def test_seed_makes_output_independent_of_batch(method):
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((6, 100)).astype(np.float32)
    sp = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = _draw(logits[2:3], [sp], [17], method=method)[0]
    others = [SamplingParams(temperature=0.7, seed=i) for i in range(6)]
    others[2] = sp
    batched = _draw(logits, others, [17] * 6, pad_to=8, method=method)[2]
    assert alone == batched
    # a different position gives an independent draw stream
    draws = {int(_draw(logits[2:3], [sp], [p], method=method)[0]) for p in range(30)}
    assert len(draws) > 1


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5),
                                dict(max_tokens=0), dict(seed=-1)])
def test_invalid_params(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)


def _exact(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """The top-k / top-p distribution by its definition: sort, cut, renormalise."""
    z = logits.astype(np.float64) / sp.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for rank, t in enumerate(order):
        if (sp.top_k and rank >= sp.top_k) or (rank and mass >= sp.top_p):
            break
        keep[t] = True
        mass += p[t]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("sp", [SamplingParams(temperature=0.8, top_k=5, seed=21),
                                SamplingParams(temperature=1.3, top_p=0.8, seed=22),
                                SamplingParams(temperature=1.0, top_k=6, top_p=0.7, seed=23),
                                SamplingParams(temperature=2.0, seed=24)])
@pytest.mark.parametrize("method", METHODS)
def test_sampled_distribution_is_the_exact_top_k_top_p_one(sp, method):
    """Chi-squared against the definition, on a small vocabulary (rejection sampling must not bend it);
    tokens outside the set are never drawn."""
    from scipy.stats import chisquare

    logits = np.random.default_rng(7).standard_normal(12).astype(np.float32) * 1.5
    want = _exact(logits, sp)
    rows = 400
    draws = np.concatenate([_draw(np.tile(logits, (rows, 1)), [sp] * rows, list(range(c * rows, (c + 1) * rows)), method=method)
                            for c in range(8)])
    counts = np.bincount(draws, minlength=12)
    assert counts[want == 0].sum() == 0
    support = want > 0
    expected = want[support] / want[support].sum() * counts.sum()
    assert chisquare(counts[support], expected).pvalue > 1e-3
