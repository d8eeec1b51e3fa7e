"""OPT (the paper's model family) as pure functions over one layer's params.

Variants covered: learned positions with OPT's offset of 2, pre-LN (most sizes) and post-LN
(``do_layer_norm_before: false``, OPT-350m, which also drops the final LayerNorm), ``project_in`` /
``project_out`` when ``word_embed_proj_dim != hidden_size``, ReLU MLP, LM head tied to the embedding.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distllm_jax.models.config import ModelConfig
from distllm_jax.models.layers import layer_norm
from distllm_jax.models.serving_layout import project_qkv

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def embed(params: dict, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    x = params["embed"]["tokens"][tokens]
    if cfg.has_project_in_out:
        x = x @ params["project_in"]
    return x + params["embed"]["positions"][positions + cfg.position_offset]


def layer(lp: dict, cfg: ModelConfig, x: jax.Array, positions: jax.Array, attend: Attend) -> jax.Array:
    a = lp["attn"]
    eps = cfg.norm_eps
    h = layer_norm(x, lp["ln1"]["scale"], lp["ln1"]["bias"], eps) if cfg.do_layer_norm_before else x
    q, k, v = project_qkv(a, h, biased=True)
    o = attend(q, k, v)
    x = x + jnp.einsum("thk,hkd->td", o, a["wo"]) + a["bo"]
    if not cfg.do_layer_norm_before:
        x = layer_norm(x, lp["ln1"]["scale"], lp["ln1"]["bias"], eps)

    m = lp["mlp"]
    h = layer_norm(x, lp["ln2"]["scale"], lp["ln2"]["bias"], eps) if cfg.do_layer_norm_before else x
    h = jax.nn.relu(h @ m["w_up"] + m["b_up"])
    x = x + h @ m["w_down"] + m["b_down"]
    if not cfg.do_layer_norm_before:
        x = layer_norm(x, lp["ln2"]["scale"], lp["ln2"]["bias"], eps)
    return x


def final(params: dict, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """Final norm and projection to logits (float32)."""
    if cfg.final_layer_norm:
        x = layer_norm(x, params["final_norm"]["scale"], params["final_norm"]["bias"], cfg.norm_eps)
    if cfg.has_project_in_out:
        x = x @ params["project_out"]
    if cfg.tie_word_embeddings:
        return jnp.einsum("te,ve->tv", x, params["embed"]["tokens"], preferred_element_type=jnp.float32)
    return jnp.einsum("te,ev->tv", x, params["lm_head"], preferred_element_type=jnp.float32)
