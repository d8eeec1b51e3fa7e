"""ModelConfig from HF config.json: both families, every variant, clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distllm_jax.models.config import ConfigError, ModelConfig, RopeConfig
from distllm_jax.models.layers import rope_inv_freq
from distllm_jax.models.params import param_count
from distllm_jax.models.presets import PRESETS, preset
from hf_models import HF_VARIANTS, hf_config


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_from_hf_variants(variant):
    hc = hf_config(variant)
    cfg = ModelConfig.from_hf_dict(hc.to_dict())
    assert cfg.num_layers == hc.num_hidden_layers and cfg.hidden_size == hc.hidden_size
    if variant == "opt-post-ln-proj":
        assert not cfg.do_layer_norm_before and not cfg.final_layer_norm and cfg.has_project_in_out
    if variant == "opt-pre-ln":
        assert cfg.do_layer_norm_before and cfg.final_layer_norm and not cfg.has_project_in_out
    if variant == "llama-gqa-llama3":
        assert cfg.num_kv_heads == 2 and cfg.rope.kind == "llama3" and cfg.rope.factor == 8.0
        assert not cfg.tie_word_embeddings
    if variant == "llama-tied":
        assert cfg.tie_word_embeddings and cfg.rope.theta == 500000.0
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    hash(cfg)  # static jit argument


def test_legacy_rope_scaling_keys():
    """Configs written before transformers 5 carry rope_theta + rope_scaling instead of rope_parameters."""
    d = preset("llama-3.1-8b")
    assert "rope_parameters" not in d
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope == RopeConfig(theta=500000.0, kind="llama3", factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192)


@pytest.mark.parametrize("variant", ["llama-gqa-llama3", "llama-tied"])
def test_rope_frequencies_match_transformers(variant):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hc = hf_config(variant)
    cfg = ModelConfig.from_hf_dict(hc.to_dict())
    ref = LlamaRotaryEmbedding(config=hc).inv_freq
    np.testing.assert_allclose(rope_inv_freq(cfg.head_dim, cfg.rope), ref.numpy(), rtol=1e-6)


def test_unknown_architecture():
    with pytest.raises(ConfigError, match=r"unknown architecture \['GPT2LMHeadModel'\]"):
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_unsupported_rope_and_missing_key():
    d = preset("tiny-llama")
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_hf_dict(d)
    d = preset("tiny-opt")
    del d["ffn_dim"]
    with pytest.raises(ConfigError, match="missing required key 'ffn_dim'"):
        ModelConfig.from_hf_dict(d)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("opt-7b")


def test_gqa_divisibility():
    d = preset("tiny-llama")
    d["num_key_value_heads"] = 3
    with pytest.raises(ConfigError, match="multiple of"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("name,billions", [("opt-13b", 12.85), ("opt-66b", 65.72), ("opt-350m", 0.331),
                                           ("llama-3-8b", 8.03), ("llama-3.2-1b", 1.236)])
def test_real_shapes_param_counts(name, billions):
    """Published sizes of the real models, from our layout alone."""
    assert param_count(ModelConfig.from_hf_dict(preset(name))) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama"])
def test_tiny_presets_match_hf_param_count(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = preset(name)
    hc = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(hc)
    assert param_count(ModelConfig.from_hf_dict(preset(name))) == sum(p.numel() for p in model.parameters())
    assert all(PRESETS[n]["architectures"] for n in PRESETS)


def test_config_is_frozen():
    cfg = ModelConfig.from_hf_dict(preset("tiny-opt"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3  # type: ignore[misc]
