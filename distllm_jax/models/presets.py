"""Built-in model configs, as Hugging Face ``config.json`` dicts.

``tiny-opt`` / ``tiny-llama`` are the embedded defaults (random weights, seconds to build on a CPU), and
``tiny-qwen2`` / ``tiny-qwen3`` / ``tiny-mistral`` their siblings in the other families; the others are
the real shapes of the paper's OPT family, of LLaMA, Qwen2.5, Qwen3 and Mistral, random-initialised for
performance work where no hub is reachable.
"""

from __future__ import annotations

import copy

from distllm_jax.models.config import ConfigError


def _opt(hidden: int, layers: int, heads: int, ffn: int, proj: int | None = None, pre_ln: bool = True) -> dict:
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "ffn_dim": ffn,
        "max_position_embeddings": 2048,
        "word_embed_proj_dim": proj or hidden,
        "do_layer_norm_before": pre_ln,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def _llama(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    inter: int,
    vocab: int,
    max_pos: int,
    theta: float,
    llama3_scaling: bool = False,
    tie: bool = False,
) -> dict:
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": inter,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5,
        "rope_theta": theta,
        "hidden_act": "silu",
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if llama3_scaling:
        d["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    return d


def _as(arch: str, model_type: str, d: dict, **keys) -> dict:
    """A LLaMA-layout config under another family's architecture name, with its own keys."""
    return {**d, "architectures": [arch], "model_type": model_type, **keys}


def _qwen(version: int, d: dict, **keys) -> dict:
    """Qwen2/Qwen3: <|endoftext|> as BOS and EOS, RMSNorm eps 1e-6, sliding windows off (as their
    published configs have them)."""
    keys = {"rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": 151643, "use_sliding_window": False,
            **keys}
    return _as(f"Qwen{version}ForCausalLM", f"qwen{version}", d, **keys)


# the tiny models get the bundled GPT-2 BPE: its <|endoftext|> stands in for Qwen's
_TINY_QWEN_IDS = {"bos_token_id": 50256, "eos_token_id": 50256}
_TINY_OPT = {**_opt(128, 2, 4, 256), "max_position_embeddings": 512}
_TINY_LLAMA = {
    **_llama(128, 2, 4, 2, 256, 50272, 512, 10000.0),
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}

PRESETS: dict[str, dict] = {
    "tiny-opt": _TINY_OPT,
    "tiny-llama": _TINY_LLAMA,
    # q/k/v bias, tied head (as Qwen2.5-0.5B..3B)
    "tiny-qwen2": _qwen(2, _llama(128, 2, 4, 2, 256, 50272, 512, 1e6, tie=True), sliding_window=512,
                        max_window_layers=2, **_TINY_QWEN_IDS),
    # q/k norm, head_dim 64 apart from 128 / 4 heads (as Qwen3-0.6B's 128 beside 1024 / 16)
    "tiny-qwen3": _qwen(3, _llama(128, 2, 4, 2, 256, 50272, 512, 1e6), head_dim=64, attention_bias=False,
                        sliding_window=None, max_window_layers=2, **_TINY_QWEN_IDS),
    "tiny-mistral": _as("MistralForCausalLM", "mistral", _llama(128, 2, 4, 2, 256, 50272, 512, 1e6),
                        sliding_window=None),
    "opt-125m": _opt(768, 12, 12, 3072),
    "opt-350m": _opt(1024, 24, 16, 4096, proj=512, pre_ln=False),
    "opt-1.3b": _opt(2048, 24, 32, 8192),
    "opt-2.7b": _opt(2560, 32, 32, 10240),
    "opt-6.7b": _opt(4096, 32, 32, 16384),
    "opt-13b": _opt(5120, 40, 40, 20480),
    "opt-30b": _opt(7168, 48, 56, 28672),
    "opt-66b": _opt(9216, 64, 72, 36864),
    "opt-175b": _opt(12288, 96, 96, 49152),
    "llama-2-7b": {**_llama(4096, 32, 32, 32, 11008, 32000, 4096, 10000.0), "rms_norm_eps": 1e-5},
    "llama-3-8b": {**_llama(4096, 32, 32, 8, 14336, 128256, 8192, 500000.0), "bos_token_id": 128000,
                   "eos_token_id": 128001},
    "llama-3.1-8b": {**_llama(4096, 32, 32, 8, 14336, 128256, 131072, 500000.0, llama3_scaling=True),
                     "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    "llama-3.2-1b": {**_llama(2048, 16, 32, 8, 8192, 128256, 131072, 500000.0, llama3_scaling=True, tie=True),
                     "head_dim": 64, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    # Qwen/Qwen2.5-7B, Qwen/Qwen3-8B and mistralai/Mistral-7B-v0.3 as their config.json has them
    "qwen2.5-7b": _qwen(2, _llama(3584, 28, 28, 4, 18944, 152064, 131072, 1e6), sliding_window=131072,
                        max_window_layers=28),
    "qwen3-8b": _qwen(3, _llama(4096, 36, 32, 8, 12288, 151936, 40960, 1e6), head_dim=128,
                      attention_bias=False, sliding_window=None, max_window_layers=36, eos_token_id=151645),
    "mistral-7b-v0.3": _as("MistralForCausalLM", "mistral", _llama(4096, 32, 32, 8, 14336, 32768, 32768, 1e6),
                           sliding_window=None),
}
PRESETS["llama-3.2-1b"]["rope_scaling"]["factor"] = 32.0

DEFAULT_PRESET = "tiny-opt"


def preset(name: str) -> dict:
    """A copy of a built-in HF config dict."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
