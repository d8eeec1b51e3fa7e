"""Tiny random Hugging Face models for parity tests (written by ``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

# one of each family beyond OPT and LLaMA: Qwen2 (q/k/v bias, tied head), Qwen3 (q/k norm, head_dim
# apart from hidden / heads), Mistral (LLaMA's layout, no sliding window)
NEW_FAMILIES = ("qwen2-bias-tied", "qwen3-qknorm-headdim", "mistral")
HF_VARIANTS = ("opt-pre-ln", "opt-post-ln-proj", "llama-gqa-llama3", "llama-tied", *NEW_FAMILIES)

_CLASSES = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}

# Larger-than-default init so logits spread over several units: parity at 1e-4 and identical greedy
# tokens then mean something (HF's default 0.02 gives near-uniform logits).
_STD = 0.15


def hf_config(variant: str):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    if variant == "opt-pre-ln":
        return OPTConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=True,
            init_std=_STD, bos_token_id=2, eos_token_id=2, pad_token_id=1,
        )
    if variant == "opt-post-ln-proj":
        return OPTConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False,
            init_std=_STD, bos_token_id=2, eos_token_id=2, pad_token_id=1,
        )
    if variant == "llama-gqa-llama3":
        return LlamaConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, initializer_range=_STD, tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
        )
    if variant == "llama-tied":
        return LlamaConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            rope_theta=500000.0, initializer_range=_STD, tie_word_embeddings=True,
        )
    if variant == "qwen2-bias-tied":
        return Qwen2Config(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=1000000.0, initializer_range=_STD, tie_word_embeddings=True, rms_norm_eps=1e-6,
        )
    if variant == "qwen3-qknorm-headdim":
        return Qwen3Config(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
            num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
            rope_theta=1000000.0, initializer_range=_STD, tie_word_embeddings=False, rms_norm_eps=1e-6,
        )
    if variant == "mistral":
        return MistralConfig(
            vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=1000000.0, initializer_range=_STD, sliding_window=None,
        )
    raise ValueError(variant)


def _randomise_norms(model, seed: int) -> None:
    """Norm scales and biases start at one and zero: draw them around that instead, so a scale or bias
    read into the wrong place (or not at all) changes the logits."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("_proj.bias"):
                p.copy_(_STD * torch.randn(p.shape, generator=g))


def make_hf_checkpoint(variant: str, out: Path, seed: int = 0):
    """Build, save and return (directory, eval-mode torch model)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(variant)
    model = getattr(transformers, _CLASSES[cfg.model_type])(cfg).eval()
    if variant in NEW_FAMILIES:
        _randomise_norms(model, seed)
    model.save_pretrained(out)
    return out, model
