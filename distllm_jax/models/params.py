"""The parameter layout: every tensor's name, shape, tensor-parallel axis and Hugging Face source.

This table is the single contract between the model math, the sharding rules, the checkpoint converter
and random initialisation; each of those reads it instead of knowing tensor names itself. The model
functions take these tensors with a few stacked together (:mod:`.serving_layout`), as an instance
places them.

Layout choices (why): linear weights are stored ``[in, out]`` so the math is ``x @ w``; attention
projections keep an explicit heads axis (``[D, H, Dh]``, ``[H, Dh, D]``) so tensor parallelism shards a
named axis and never splits a head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np

from distllm_jax.models.config import ModelConfig

Params = dict[str, Any]  # {"embed": ..., "layers": [ {...}, ... ], ...}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter. ``tp_axis`` is the axis split over the tensor-parallel mesh axis (None: replicated).

    ``hf_name`` is the HF tensor name without the model prefix and ``hf_shape`` its shape there;
    ``transpose`` marks a torch Linear weight (``[out, in]``) that becomes ``[in, out]`` here.
    """

    name: str
    shape: tuple[int, ...]
    tp_axis: int | None
    hf_name: str
    hf_shape: tuple[int, ...]
    transpose: bool = False
    init: str = "normal"  # normal | ones | zeros

    def from_hf(self, a: np.ndarray) -> np.ndarray:
        """HF array -> our layout (a view when no transpose; the caller makes it contiguous)."""
        return (a.T if self.transpose else a).reshape(self.shape)


def _linear(name: str, shape: tuple[int, ...], n_in: int, tp: int | None, hf: str) -> TensorSpec:
    """A Linear weight whose first ``n_in`` axes (in our layout) are its input features."""
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    return TensorSpec(name, shape, tp, hf, (fan_out, fan_in), transpose=True)


def _vec(
    name: str,
    shape: tuple[int, ...],
    tp: int | None,
    hf: str,
    init: str = "normal",
    flat_in_hf: bool = False,
) -> TensorSpec:
    """A tensor kept in HF's layout (embeddings, norms); ``flat_in_hf`` for per-head biases."""
    hf_shape = (math.prod(shape),) if flat_in_hf else shape
    return TensorSpec(name, shape, tp, hf, hf_shape, init=init)


def _layer_specs(cfg: ModelConfig, i: int) -> list[TensorSpec]:
    D, H, K, Dh, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    p = f"layers.{i}."
    if cfg.family == "opt":
        hp = f"decoder.layers.{i}."
        specs = [
            _vec(p + "ln1.scale", (D,), None, hp + "self_attn_layer_norm.weight", "ones"),
            _vec(p + "ln1.bias", (D,), None, hp + "self_attn_layer_norm.bias", "zeros"),
        ]
        for n in "qkv":
            specs.append(_linear(p + f"attn.w{n}", (D, H, Dh), 1, 1, hp + f"self_attn.{n}_proj.weight"))
            specs.append(
                _vec(p + f"attn.b{n}", (H, Dh), 0, hp + f"self_attn.{n}_proj.bias", "zeros", flat_in_hf=True)
            )
        return specs + [
            _linear(p + "attn.wo", (H, Dh, D), 2, 0, hp + "self_attn.out_proj.weight"),
            _vec(p + "attn.bo", (D,), None, hp + "self_attn.out_proj.bias", "zeros"),
            _vec(p + "ln2.scale", (D,), None, hp + "final_layer_norm.weight", "ones"),
            _vec(p + "ln2.bias", (D,), None, hp + "final_layer_norm.bias", "zeros"),
            _linear(p + "mlp.w_up", (D, F), 1, 1, hp + "fc1.weight"),
            _vec(p + "mlp.b_up", (F,), 0, hp + "fc1.bias", "zeros"),
            _linear(p + "mlp.w_down", (F, D), 1, 0, hp + "fc2.weight"),
            _vec(p + "mlp.b_down", (D,), None, hp + "fc2.bias", "zeros"),
        ]
    hp = f"layers.{i}."
    specs = [
        _vec(p + "ln1.scale", (D,), None, hp + "input_layernorm.weight", "ones"),
        _linear(p + "attn.wq", (D, H, Dh), 1, 1, hp + "self_attn.q_proj.weight"),
        _linear(p + "attn.wk", (D, K, Dh), 1, 1, hp + "self_attn.k_proj.weight"),
        _linear(p + "attn.wv", (D, K, Dh), 1, 1, hp + "self_attn.v_proj.weight"),
        _linear(p + "attn.wo", (H, Dh, D), 2, 0, hp + "self_attn.o_proj.weight"),
    ]
    if cfg.has_qkv_bias:  # split over heads like their weights
        specs += [
            _vec(p + "attn.bq", (H, Dh), 0, hp + "self_attn.q_proj.bias", "zeros", flat_in_hf=True),
            _vec(p + "attn.bk", (K, Dh), 0, hp + "self_attn.k_proj.bias", "zeros", flat_in_hf=True),
            _vec(p + "attn.bv", (K, Dh), 0, hp + "self_attn.v_proj.bias", "zeros", flat_in_hf=True),
        ]
    if cfg.attention_bias:
        specs.append(_vec(p + "attn.bo", (D,), None, hp + "self_attn.o_proj.bias", "zeros"))
    if cfg.qk_norm:  # one scale per head dimension, shared by every head: replicated
        specs += [
            _vec(p + "attn.q_norm", (Dh,), None, hp + "self_attn.q_norm.weight", "ones"),
            _vec(p + "attn.k_norm", (Dh,), None, hp + "self_attn.k_norm.weight", "ones"),
        ]
    specs += [
        _vec(p + "ln2.scale", (D,), None, hp + "post_attention_layernorm.weight", "ones"),
        _linear(p + "mlp.w_gate", (D, F), 1, 1, hp + "mlp.gate_proj.weight"),
        _linear(p + "mlp.w_up", (D, F), 1, 1, hp + "mlp.up_proj.weight"),
        _linear(p + "mlp.w_down", (F, D), 1, 0, hp + "mlp.down_proj.weight"),
    ]
    if cfg.mlp_bias:
        specs += [
            _vec(p + "mlp.b_gate", (F,), 0, hp + "mlp.gate_proj.bias", "zeros"),
            _vec(p + "mlp.b_up", (F,), 0, hp + "mlp.up_proj.bias", "zeros"),
            _vec(p + "mlp.b_down", (D,), None, hp + "mlp.down_proj.bias", "zeros"),
        ]
    return specs


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """All parameters in a stable order (embeddings, layers, head): the converter streams in this order."""
    D, E, V = cfg.hidden_size, cfg.embed_dim, cfg.vocab_size
    specs: list[TensorSpec] = []
    if cfg.family == "opt":
        npos = cfg.max_position_embeddings + cfg.position_offset
        specs.append(_vec("embed.tokens", (V, E), 0, "decoder.embed_tokens.weight"))
        specs.append(_vec("embed.positions", (npos, D), None, "decoder.embed_positions.weight"))
        if cfg.has_project_in_out:
            specs.append(_linear("project_in", (E, D), 1, None, "decoder.project_in.weight"))
    else:
        specs.append(_vec("embed.tokens", (V, D), 0, "embed_tokens.weight"))
    for i in range(cfg.num_layers):
        specs.extend(_layer_specs(cfg, i))
    if cfg.family == "opt":
        if cfg.final_layer_norm:
            specs.append(_vec("final_norm.scale", (D,), None, "decoder.final_layer_norm.weight", "ones"))
            specs.append(_vec("final_norm.bias", (D,), None, "decoder.final_layer_norm.bias", "zeros"))
        if cfg.has_project_in_out:
            specs.append(_linear("project_out", (D, E), 1, None, "decoder.project_out.weight"))
    else:
        specs.append(_vec("final_norm.scale", (D,), None, "norm.weight", "ones"))
    if not cfg.tie_word_embeddings:
        # lm_head lives outside the base model in HF: the converter looks it up without the model prefix.
        specs.append(_linear("lm_head", (E, V), 1, 1, "lm_head.weight"))
    return specs


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {s.name: s.shape for s in tensor_specs(cfg)}


def param_count(cfg: ModelConfig) -> int:
    """Number of parameters, counted from the parameter spec so it can never drift from it."""
    return sum(math.prod(s) for s in param_shapes(cfg).values())


# ---- flat -> nested ---------------------------------------------------------------------------------
# Flat names ("layers.3.attn.wq") are the checkpoint/converter view; the nested pytree (layers as a
# list, so pipeline stages can slice it) is what the model functions take.


def unflatten(flat: dict[str, Any], cfg: ModelConfig) -> Params:
    out: Params = {"layers": [dict() for _ in range(cfg.num_layers)]}
    for name, value in flat.items():
        parts = name.split(".")
        if parts[0] == "layers":
            node = out["layers"][int(parts[1])]
            parts = parts[2:]
        else:
            node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


# ---- random initialisation (embedded default model, performance work at real shapes) ----------------


def random_tensor(spec: TensorSpec, seed: int, dtype: Any, std: float = 0.02) -> np.ndarray:
    """One tensor, seeded by its name so streaming init gives the same model in any order."""
    if spec.init == "ones":
        return np.ones(spec.shape, dtype)
    if spec.init == "zeros":
        return np.zeros(spec.shape, dtype)
    name_seed = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_seed])
    return (rng.standard_normal(spec.shape, dtype=np.float32) * std).astype(dtype)


def bytes_per_dtype(flat_dtypes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for shape, dt in flat_dtypes.values():
        key = np.dtype(dt).name
        out[key] = out.get(key, 0) + math.prod(shape) * np.dtype(dt).itemsize
    return out
