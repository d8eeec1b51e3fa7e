"""The LLaMA layout as pure functions: RMSNorm, RoPE (default / linear / llama3 scaling), grouped-query
attention, SwiGLU MLP, tied or untied LM head; with the switches the other families of this layout
need (``ModelConfig``): q/k/v bias (Qwen2), RMSNorm on each head of q and k before RoPE (Qwen3), a
``head_dim`` apart from ``hidden_size / heads`` (Qwen3). Mistral is LLaMA's layout as it is."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distllm_jax.models.config import ModelConfig
from distllm_jax.models.layers import apply_rope, rms_norm
from distllm_jax.models.serving_layout import project_qkv

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def embed(params: dict, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    return params["embed"]["tokens"][tokens]


def layer(lp: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array, attend: Attend) -> jax.Array:
    a = lp["attn"]
    assert cfg.rope is not None
    h = rms_norm(x, lp["ln1"]["scale"], cfg.norm_eps)
    q, k, v = project_qkv(a, h, cfg.has_qkv_bias)
    if cfg.qk_norm:  # per head, over head_dim
        q, k = rms_norm(q, a["q_norm"], cfg.norm_eps), rms_norm(k, a["k_norm"], cfg.norm_eps)
    q = apply_rope(q, positions, cfg.head_dim, cfg.rope)
    k = apply_rope(k, positions, cfg.head_dim, cfg.rope)
    o = jnp.einsum("thk,hkd->td", attend(q, k, v), a["wo"])
    if cfg.attention_bias:
        o = o + a["bo"]
    x = x + o

    m = lp["mlp"]
    h = rms_norm(x, lp["ln2"]["scale"], cfg.norm_eps)
    gate_up = jnp.einsum("td,dcf->tcf", h, m["w_gate_up"])  # gate and up stacked (serving_layout)
    if cfg.mlp_bias:
        gate_up = gate_up + m["b_gate_up"]
    down = (jax.nn.silu(gate_up[:, 0]) * gate_up[:, 1]) @ m["w_down"]
    if cfg.mlp_bias:
        down = down + m["b_down"]
    return x + down


def final(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    x = rms_norm(x, params["final_norm"]["scale"], cfg.norm_eps)
    if cfg.tie_word_embeddings:
        return jnp.einsum("td,vd->tv", x, params["embed"]["tokens"], preferred_element_type=jnp.float32)
    return jnp.einsum("td,dv->tv", x, params["lm_head"], preferred_element_type=jnp.float32)
