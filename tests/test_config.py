"""ModelConfig from HF config.json: both families, every variant, clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from distllm_jax.models.config import ConfigError, ModelConfig, RopeConfig
from distllm_jax.models.layers import rope_inv_freq
from distllm_jax.models.params import param_count
from distllm_jax.models.presets import PRESETS, preset
from hf_models import HF_VARIANTS, NEW_FAMILIES, hf_config


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
    if variant == "qwen2-bias-tied":  # Qwen2 biases q/k/v (never o) whatever the config says
        assert cfg.qkv_bias and not cfg.attention_bias and not cfg.qk_norm and cfg.tie_word_embeddings
    if variant == "qwen3-qknorm-headdim":
        assert cfg.qk_norm and not cfg.has_qkv_bias and cfg.head_dim == 16 != cfg.hidden_size // cfg.num_heads
    if variant == "mistral":
        assert not (cfg.has_qkv_bias or cfg.qk_norm or cfg.attention_bias) and cfg.num_kv_heads == 2
    if variant in NEW_FAMILIES:
        assert cfg.family == "llama" and cfg.name == hc.model_type and cfg.rope.theta == 1e6
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
    with pytest.raises(ConfigError, match=r"unknown architecture \['GPT2LMHeadModel'\]") as e:
        ModelConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    for arch in ("OPTForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert f"'{arch}'" in str(e.value)


@pytest.mark.parametrize("name,edit,refused", [
    ("tiny-mistral", {"sliding_window": 4096, "max_position_embeddings": 32768}, True),
    ("tiny-mistral", {"sliding_window": 512}, False),  # the whole context: full attention
    ("tiny-mistral", {"sliding_window": None}, False),
    ("tiny-mistral", {"sliding_window": "absent", "max_position_embeddings": 32768}, True),  # default 4096
    ("tiny-qwen2", {"use_sliding_window": True, "sliding_window": 128, "max_window_layers": 1}, True),
    ("tiny-qwen2", {"use_sliding_window": False, "sliding_window": 128, "max_window_layers": 1}, False),  # off
    ("tiny-qwen2", {"use_sliding_window": True, "sliding_window": 128}, False),  # from layer 2 of 2: none
    ("tiny-qwen3", {"use_sliding_window": True, "sliding_window": 128,
                    "layer_types": ["full_attention", "sliding_attention"]}, True),
    ("tiny-qwen3", {"use_sliding_window": True, "sliding_window": 128,
                    "layer_types": ["full_attention", "full_attention"]}, False),
    ("qwen2.5-7b", {}, False),  # sliding_window 131072 in its config.json, but off
])
def test_sliding_window_is_refused_where_it_would_slide(name, edit, refused):
    """No sliding-window attention here: a config whose window would cut the context is refused,
    naming the field; one whose window never binds (off, null, or the whole context) serves as LLaMA."""
    from transformers import AutoConfig

    d = preset(name)
    d.update(edit)
    if d["sliding_window"] == "absent":
        del d["sliding_window"]
    hc = AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    slides = hc.sliding_window is not None and hc.sliding_window < hc.max_position_embeddings and (
        "sliding_attention" in hc.layer_types if hc.model_type != "mistral" else True)
    assert slides == refused, "transformers reads this config otherwise"
    if refused:
        with pytest.raises(ConfigError, match=r"sliding_window=\d+ is shorter than the context"):
            ModelConfig.from_hf_dict(d)
    else:
        assert ModelConfig.from_hf_dict(d).family == "llama"


def test_family_switches_follow_transformers_not_the_config():
    """transformers' Qwen2 always biases q/k/v (and never o) and Mistral never biases: a stray
    ``attention_bias`` in their config.json changes nothing, as it changes nothing there."""
    for name in ("tiny-qwen2", "tiny-mistral"):
        d = {**preset(name), "attention_bias": True, "mlp_bias": True}
        cfg = ModelConfig.from_hf_dict(d)
        assert not cfg.attention_bias and not cfg.mlp_bias and cfg.qkv_bias == (name == "tiny-qwen2")
    cfg = ModelConfig.from_hf_dict({**preset("tiny-qwen3"), "attention_bias": True})
    assert cfg.attention_bias and cfg.has_qkv_bias and cfg.qk_norm
    assert ModelConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                  if k not in ("qkv_bias", "qk_norm", "model_type")}).name == "llama"


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
                                           ("llama-3-8b", 8.03), ("llama-3.2-1b", 1.236),
                                           ("qwen2.5-7b", 7.616), ("qwen3-8b", 8.191), ("mistral-7b-v0.3", 7.248)])
def test_real_shapes_param_counts(name, billions):
    """Published sizes of the real models, from our layout alone."""
    assert param_count(ModelConfig.from_hf_dict(preset(name))) / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("name", ["tiny-opt", "tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral",
                                  "qwen2.5-7b", "qwen3-8b", "mistral-7b-v0.3"])
def test_presets_match_hf_param_count(name):
    """The preset built by transformers (on the meta device: no memory) has our layout's count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = preset(name)
    hc = AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hc)
    assert type(model).__name__ == PRESETS[name]["architectures"][0]
    assert param_count(ModelConfig.from_hf_dict(preset(name))) == sum(p.numel() for p in model.parameters())
    assert all(PRESETS[n]["architectures"] for n in PRESETS)


def test_config_is_frozen():
    cfg = ModelConfig.from_hf_dict(preset("tiny-opt"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_layers = 3  # type: ignore[misc]
