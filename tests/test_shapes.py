"""The compiled shapes (distllm_jax.shapes): the bucket rule above the top bucket per caller, and the
shapes an instance compiles, which the simulator pads to."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distllm_jax.placement.latency import Fit
from distllm_jax.placement.simulator import SimConfig
from distllm_jax.shapes import MIN_TOKEN_BUCKET, StepKind, bucket, compiled_shapes, pow2_buckets


def test_pow2_buckets_reach_the_top():
    assert pow2_buckets(16, 100) == (16, 32, 64, 128)
    assert pow2_buckets(16, 128) == (16, 32, 64, 128)  # the top itself when it is a power of two
    assert pow2_buckets(1, 1) == (1,) and pow2_buckets(0, 3) == (1, 2, 4)
    assert pow2_buckets(32, 8) == (32,)  # lo alone when it already holds hi


def test_bucket_pads_up_and_says_what_happens_above_the_top():
    b = (16, 32, 64)
    assert [bucket(b, n) for n in (0, 1, 16, 17, 64)] == [16, 16, 16, 32, 64]
    with pytest.raises(ValueError, match="65 exceeds the largest bucket 64"):
        bucket(b, 65)  # the engine: no program of that shape exists
    assert bucket(b, 65, above="exact") == 65  # the simulator: timed at its own size
    assert bucket(b, 17, above="exact") == 32


def test_step_kinds_read_as_their_words():
    """Step logs, stats and JSON keep the plain words; a plain word still picks the same kind."""
    assert [str(k) for k in StepKind] == ["prefill", "decode", "mixed"]
    assert StepKind("decode") is StepKind.DECODE and f"{StepKind.MIXED}-0" == "mixed-0"
    assert {StepKind.PREFILL: 1}["prefill"] == 1  # the jitted step's static argument hashes the same
    with pytest.raises(ValueError):
        StepKind("sample")


def test_compiled_shapes():
    s = compiled_shapes(prefill_token_budget=512, max_decode_batch=24, max_len=2048)
    assert s.prefill == (16, 32, 64, 128, 256, 512, 1024, 2048)  # one whole sequence, past the budget
    assert s.decode == (1, 2, 4, 8, 16, 24)  # the batch limit itself, not the next power of two
    assert s.mixed == (16, 32, 64, 128, 256, 512)  # a chunked step never exceeds the budget
    assert s.for_kind("decode") == s.for_kind(StepKind.DECODE) == s.decode and s.sim_fields() == {"token_buckets": s.prefill, "batch_buckets": s.decode}
    with pytest.raises(ValueError, match="unknown step kind"):
        s.for_kind("sample")
    t = compiled_shapes(prefill_token_budget=100, max_decode_batch=32, max_len=64, min_token_bucket=32)
    assert t.prefill == t.mixed == (32, 64, 128) and t.decode == (1, 2, 4, 8, 16, 32)
    assert MIN_TOKEN_BUCKET == 16


@pytest.mark.parametrize("budget,batch,max_len,lo", [(512, 32, 512, 16), (64, 8, 128, 16), (100, 5, 2048, 32),
                                                     (16, 1, 16, 16), (768, 512, 4096, 16)])
def test_compiled_shapes_are_the_ones_instance_compiled_before(budget, batch, max_len, lo):
    """The formulas Instance used before they moved here, pinned: the engine compiles the same set."""
    s = compiled_shapes(prefill_token_budget=budget, max_decode_batch=batch, max_len=max_len, min_token_bucket=lo)
    assert s.prefill == pow2_buckets(lo, max(budget, max_len))
    assert s.decode == tuple(b for b in pow2_buckets(1, batch) if b < batch) + (batch,)
    assert s.mixed == pow2_buckets(lo, budget)
    # mixed is the prefill shapes' prefix: the simulator pads chunked steps with the latter alike
    assert all(bucket(s.prefill, n) == bucket(s.mixed, n) for n in range(1, budget + 1))


def test_the_simulator_pads_to_the_shapes_and_runs_past_the_top_unpadded():
    fit = Fit((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.0, 0.0, 1.0))  # prefill 1 ms a token, decode 1 ms a row
    s = compiled_shapes(prefill_token_budget=64, max_decode_batch=8, max_len=64)
    cfg = SimConfig(**s.sim_fields())
    assert cfg.prefill_s(fit, [20], 1) == pytest.approx(0.032)  # 20 tokens run as 32
    assert cfg.decode_s(fit, 5, 0, 1) == pytest.approx(0.008)  # 5 rows as 8
    assert cfg.decode_s(fit, 9, 0, 1) == pytest.approx(0.009)  # past the top bucket: as they are
    assert SimConfig().decode_s(fit, 5, 0, 1) == pytest.approx(0.005)  # no shapes: exact


def test_the_shared_modules_import_no_jax():
    code = ("import sys; import distllm_jax.shapes, distllm_jax.instance_spec, distllm_jax.placement.simulator, "
            "distllm_jax.placement.plan, distllm_jax.placement.search, bench.multi_gpu; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
