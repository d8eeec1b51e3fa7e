"""Tiny random Hugging Face models for parity tests (written by ``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path

HF_VARIANTS = ("opt-pre-ln", "opt-post-ln-proj", "llama-gqa-llama3", "llama-tied")

# Larger-than-default init so logits spread over several units: parity at 1e-4 and identical greedy
# tokens then mean something (HF's default 0.02 gives near-uniform logits).
_STD = 0.15


def hf_config(variant: str):
    from transformers import LlamaConfig, OPTConfig

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
    raise ValueError(variant)


def make_hf_checkpoint(variant: str, out: Path, seed: int = 0):
    """Build, save and return (directory, eval-mode torch model)."""
    import torch
    from transformers import LlamaForCausalLM, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(variant)
    cls = OPTForCausalLM if variant.startswith("opt") else LlamaForCausalLM
    model = cls(cfg).eval()
    model.save_pretrained(out)
    return out, model
