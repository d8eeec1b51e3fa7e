"""Numerics against Hugging Face transformers (torch, CPU): convert -> restore -> prefill -> decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distllm_jax.checkpoint import restore_params
from distllm_jax.models.params import param_count
from engine_workload import hf_greedy
from hf_models import HF_VARIANTS
from model_runner import greedy_generate

PROMPTS = [
    [5, 9, 23, 7, 1, 100, 42, 17, 250, 3, 66],
    [3, 4],
    [77, 12, 15, 19, 21, 2, 8, 9, 11, 200, 201, 202, 203, 13, 14, 99, 98, 97, 5],
    [31],
]
N_NEW = 32


@pytest.fixture(scope="module", params=HF_VARIANTS)
def variant_run(request, converted):
    model, ckpt = converted(request.param)
    cfg, params = restore_params(ckpt)
    tokens, logits = greedy_generate(params, cfg, PROMPTS, N_NEW, return_prefill_logits=True)
    return request.param, model, cfg, tokens, logits


def test_prefill_logits_match_hf(variant_run):
    variant, model, cfg, _, logits = variant_run
    off = 0
    worst = 0.0
    for p in PROMPTS:
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].numpy()
        ours = logits[off : off + len(p)]
        assert ours.shape == ref.shape
        worst = max(worst, float(np.abs(ours - ref).max()))
        off += len(p)
    # the logits must be far from trivial for the tolerance to mean anything
    assert logits.std() > 0.5, f"{variant}: logits too flat ({logits.std()})"
    assert worst < 1e-4, f"{variant}: max |logit diff| {worst}"


def test_greedy_tokens_match_hf(variant_run):
    variant, model, cfg, tokens, _ = variant_run
    for p, ours in zip(PROMPTS, tokens):
        ref = hf_greedy(model, p, N_NEW)
        assert ours == ref, f"{variant}: prompt {p[:4]}... diverged"
    assert len({t for seq in tokens for t in seq}) > 4, "greedy output is degenerate"


def test_config_matches_hf(converted):
    """Parameter counts from our layout equal the HF model's (no tensor forgotten or invented)."""
    for variant in HF_VARIANTS:
        model, ckpt = converted(variant)
        cfg, _ = restore_params(ckpt)
        hf_count = sum(p.numel() for p in model.parameters())  # tied weights counted once by torch
        assert param_count(cfg) == hf_count, variant


# ---- bfloat16 (the GPU default) -----------------------------------------------------------------
# bf16 cannot match float32 to 1e-4, so the bar is transformers' own bf16: the same checkpoint cast to
# bf16 and run by transformers deviates from its float32 run by some amount (the rounding of weights
# and activations); ours may deviate by at most twice that. A greedy token is checked wherever that
# bound cannot flip it: where the float32 reference's top-2 margin exceeds twice the bound.
BF16_SLACK = 2.0


# Mistral's math is LLaMA's to the letter, and Qwen2's is LLaMA's plus a bias on q/k/v: their bf16
# runs would repeat llama-gqa-llama3's; Qwen3's per-head q/k norms are new arithmetic, so it runs
@pytest.fixture(scope="module", params=[v for v in HF_VARIANTS if v not in ("mistral", "qwen2-bias-tied")])
def bf16_run(request, hf_checkpoints, tmp_path_factory):
    import copy

    import jax.numpy as jnp

    from distllm_jax.checkpoint import convert

    hf_dir, model = hf_checkpoints(request.param)
    out = tmp_path_factory.mktemp("bf16") / request.param
    convert(hf_dir, out, dtype="bfloat16", progress=False)
    cfg, params = restore_params(out)
    tokens, logits = greedy_generate(params, cfg, PROMPTS, N_NEW, dtype=jnp.bfloat16, return_prefill_logits=True)
    hf_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    return request.param, model, hf_bf16, tokens, logits


def test_bf16_prefill_logits_within_transformers_bf16_error(bf16_run):
    variant, model, hf_bf16, _, logits = bf16_run
    off, ours_err, hf_err = 0, 0.0, 0.0
    for p in PROMPTS:
        with torch.no_grad():
            ref = model(torch.tensor([p])).logits[0].numpy()
            theirs = hf_bf16(torch.tensor([p])).logits[0].float().numpy()
        ours_err = max(ours_err, float(np.abs(logits[off : off + len(p)] - ref).max()))
        hf_err = max(hf_err, float(np.abs(theirs - ref).max()))
        off += len(p)
    assert hf_err > 0, f"{variant}: transformers' bf16 run equals float32: the cast did not happen"
    assert ours_err <= BF16_SLACK * hf_err, f"{variant}: bf16 logits off by {ours_err}, transformers' bf16 by {hf_err}"


def test_bf16_greedy_tokens_are_float32_greedy_where_rounding_cannot_flip_them(bf16_run):
    """Our bf16 tokens (prefill, then decode steps over a bf16 KV pool), teacher-forced through the
    float32 reference: each is its argmax wherever the margin is beyond bf16's reach."""
    variant, model, hf_bf16, tokens, _ = bf16_run
    checked = 0
    for p, ours in zip(PROMPTS, tokens):
        ids = torch.tensor([p + ours])
        with torch.no_grad():
            ref = model(ids).logits[0, len(p) - 1 : -1].numpy()  # the logits each of our tokens followed
            theirs = hf_bf16(ids).logits[0, len(p) - 1 : -1].float().numpy()
        bound = BF16_SLACK * float(np.abs(theirs - ref).max())
        top2 = np.sort(ref, -1)[:, -2:]
        for k, tok in enumerate(ours):
            if top2[k, 1] - top2[k, 0] > 2 * bound:
                assert tok == int(ref[k].argmax()), f"{variant}: prompt {p[:4]}... token {k} is not greedy"
                checked += 1
    assert checked >= len(PROMPTS) * N_NEW // 4, f"{variant}: only {checked} tokens beyond bf16's reach"
