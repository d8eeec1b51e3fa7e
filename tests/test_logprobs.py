"""Log-probabilities, prompt log-probabilities and n > 1 samples through the engine, in every mode.

Values are checked against ``transformers``' log-softmax in float32 (tiny OPT and LLaMA); ``n``
samples of one prompt share its prefill (one prompt segment in the step log) and its full pages,
and every page is free again afterwards (shared pages freed once)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distllm_jax.engine import Engine, FinishReason, InstanceSpec, SamplingParams
from engine_workload import hf_greedy, small_config

MODES = {
    "disaggregated": dict(prefill=(InstanceSpec(1),), decode=(InstanceSpec(2),)),
    "colocated": dict(mode="colocated", colocated=(InstanceSpec(1),)),
    # a 16-token budget: the 30-token prompt below is computed in two chunks
    "chunked": dict(mode="chunked", colocated=(InstanceSpec(1),), prefill_token_budget=16),
}
LEAN = dict(max_prefill_seqs=4, max_decode_batch=4, max_seq_len=48, min_token_bucket=16)
PROMPTS = [[5, 9, 23, 7, 1, 100, 42, 17, 250, 3, 66, 8, 14, 91, 120, 33, 2, 200, 45, 61, 77, 12, 19, 21, 3, 8, 9,
            10, 11, 140], [3, 4, 5]]


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 log-softmax: row j scores the token after position j."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.fixture(scope="module", params=["opt-pre-ln", "llama-gqa-llama3"])
def model_and_ckpt(request, converted):
    return converted(request.param)


@pytest.mark.parametrize("mode", list(MODES))
def test_logprobs_equal_transformers(model_and_ckpt, mode):
    model, ckpt = model_and_ckpt
    with Engine(ckpt, small_config(**MODES[mode], **LEAN)) as engine:
        streams = [engine.submit(p, SamplingParams(max_tokens=6, logprobs=5, prompt_logprobs=3, ignore_eos=True))
                   for p in PROMPTS]
        echo = engine.submit(PROMPTS[0], SamplingParams(max_tokens=0, prompt_logprobs=0))
        sampled = engine.submit(PROMPTS[1], SamplingParams(max_tokens=6, temperature=1.5, seed=3, logprobs=0,
                                                           ignore_eos=True))
        outs = [s.result() for s in streams]
        echo_out, sampled_out = echo.result(), sampled.result()
        assert engine.wait_idle(10)
        engine.assert_no_leaks()
    for prompt, out in zip(PROMPTS, outs):
        assert out.error is None and out.finished is FinishReason.LENGTH
        assert out.token_ids == hf_greedy(model, prompt, 6)
        ref = hf_logprobs(model, prompt + out.token_ids)
        assert len(out.logprobs) == 6
        for j, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            row = ref[len(prompt) - 1 + j]
            assert lp.token == tok and abs(lp.logprob - row[tok].item()) < 1e-4
            top = torch.topk(row, 5)
            assert [t for t, _ in lp.top] == top.indices.tolist()
            np.testing.assert_allclose([v for _, v in lp.top], top.values.numpy(), atol=1e-4)
        assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs), abs=1e-4)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            lp = out.prompt_logprobs[j]
            assert lp.token == prompt[j] and abs(lp.logprob - ref[j - 1, prompt[j]].item()) < 1e-4
            assert [t for t, _ in lp.top] == torch.topk(ref[j - 1], 3).indices.tolist()
    # echo with max_tokens 0: the prompt's log-probabilities and nothing generated
    assert echo_out.token_ids == [] and echo_out.finished is FinishReason.LENGTH
    assert [lp.logprob for lp in echo_out.prompt_logprobs[1:]] == pytest.approx(
        [lp.logprob for lp in outs[0].prompt_logprobs[1:]], abs=1e-5)
    assert all(lp.top == () for lp in echo_out.prompt_logprobs[1:])
    # a sampled token's log-probability is the raw model's, before temperature
    ref = hf_logprobs(model, PROMPTS[1] + sampled_out.token_ids)
    for j, (tok, lp) in enumerate(zip(sampled_out.token_ids, sampled_out.logprobs)):
        assert abs(lp.logprob - ref[len(PROMPTS[1]) - 1 + j, tok].item()) < 1e-4 and lp.top == ()


@pytest.mark.parametrize("mode", list(MODES))
def test_n_samples_share_one_prefill(model_and_ckpt, mode):
    model, ckpt = model_and_ckpt
    prompt = PROMPTS[0]
    with Engine(ckpt, small_config(**MODES[mode], **LEAN)) as engine:
        seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=4, ignore_eos=True)
        first = engine.submit(prompt, seeded).results()
        again = engine.submit(prompt, seeded).results()
        greedy = engine.submit(prompt, SamplingParams(max_tokens=8, n=4, ignore_eos=True, logprobs=0)).results()
        log = engine.step_log()
        assert engine.wait_idle(10)
        engine.assert_no_leaks()  # the shared prompt pages went back once, with the last sample
    assert [o.index for o in first] == [0, 1, 2, 3]
    assert [o.token_ids for o in first] == [o.token_ids for o in again]  # reproducible with a seed
    assert len({tuple(o.token_ids) for o in first}) == 4  # and the 4 streams differ
    expected = hf_greedy(model, prompt, 8)
    assert [o.token_ids for o in greedy] == [expected] * 4  # each sample's copy of the last prompt page is right
    for o in greedy[1:]:  # (batch shapes differ between samples: float32 rounding, no more)
        assert [lp.logprob for lp in o.logprobs] == pytest.approx([lp.logprob for lp in greedy[0].logprobs], abs=1e-5)
    # prompt tokens computed (decode rows are single tokens; this prompt's chunks are longer)
    computed = sum(n for r in log if r.kind != "decode" for n in r.lengths if n > 1)
    assert computed == 3 * len(prompt)  # three requests' prompts, each computed once for all its samples


def test_cancel_and_limits_of_n(converted):
    _, ckpt = converted("opt-pre-ln")
    with Engine(ckpt, small_config(**MODES["colocated"], **LEAN)) as engine:
        with pytest.raises(ValueError, match="n = 5 samples"):
            engine.submit([1, 2, 3], SamplingParams(n=5))
        s = engine.submit(PROMPTS[0], SamplingParams(max_tokens=16, n=3, ignore_eos=True))
        assert engine.cancel(s.request_id)
        outs = s.results()
        assert sorted(o.index for o in outs) == [0, 1, 2]
        assert {o.finished for o in outs} <= {FinishReason.CANCELLED, FinishReason.LENGTH}
        assert engine.wait_idle(10)
        engine.assert_no_leaks()
