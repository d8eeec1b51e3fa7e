"""Model configuration, read from a Hugging Face ``config.json``.

One dataclass covers both layouts so the engine, the sharding rules and the converter never branch on
raw HF keys: every family difference the model math needs is an explicit field here. ``family`` is the
layout the math follows: ``opt``, or ``llama`` for every RMSNorm/RoPE/SwiGLU decoder (LLaMA, Qwen2 and
Qwen2.5, Qwen3, Mistral), whose differences are switches (q/k/v bias, q/k norm, an explicit
``head_dim``, the RoPE theta); ``model_type`` keeps the checkpoint's own name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["opt", "llama"]

# HF architecture -> model_type; model_type -> the layout its math follows
SUPPORTED_ARCHITECTURES = {
    "OPTForCausalLM": "opt",
    "OPTModel": "opt",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2Model": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3Model": "qwen3",
    "MistralForCausalLM": "mistral",
    "MistralModel": "mistral",
}
SUPPORTED_MODEL_TYPES: dict[str, Family] = {
    "opt": "opt", "llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama"}


class ConfigError(ValueError):
    """A config.json the project cannot serve (unknown architecture, unsupported option)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (LLaMA). ``kind`` is HF's ``rope_type``."""

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only model; hashable so it can be a static jit argument."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    # OPT only
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    position_offset: int = 2
    # the llama layout
    rope: RopeConfig | None = None
    attention_bias: bool = False  # bias on q, k, v and o (LLaMA's and Qwen3's `attention_bias`)
    mlp_bias: bool = False
    qkv_bias: bool = False  # bias on q, k and v only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    model_type: str | None = None  # the checkpoint's HF model_type (None in checkpoints written before it)
    # token ids the engine needs
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.family == "opt" and self.head_dim * self.num_heads != self.hidden_size:
            raise ConfigError(
                f"OPT hidden_size ({self.hidden_size}) must equal heads ({self.num_heads}) x head_dim"
            )

    @property
    def has_qkv_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias

    @property
    def name(self) -> str:
        """The model family as its checkpoint names it (``qwen3``), for messages."""
        return self.model_type or self.family

    @property
    def has_project_in_out(self) -> bool:
        return (
            self.family == "opt"
            and self.word_embed_proj_dim is not None
            and self.word_embed_proj_dim != self.hidden_size
        )

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT's ``word_embed_proj_dim`` may differ from hidden)."""
        if self.family == "opt" and self.word_embed_proj_dim is not None:
            return self.word_embed_proj_dim
        return self.hidden_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope") is not None:
            d["rope"] = RopeConfig(**d["rope"])
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = tuple(d["eos_token_id"])
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = _detect_model_type(hf, source)
        if SUPPORTED_MODEL_TYPES[model_type] == "opt":
            return _opt_from_hf(hf, source)
        return _llama_from_hf(hf, source, model_type)

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no config.json found") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf_dict(hf, source=str(path))


def _detect_model_type(hf: dict[str, Any], source: str) -> str:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    mt = hf.get("model_type")
    if mt in SUPPORTED_MODEL_TYPES and not archs:
        return mt
    raise ConfigError(
        f"{source}: unknown architecture {archs or mt!r}; supported: "
        f"{sorted(SUPPORTED_ARCHITECTURES)} (model_type {sorted(SUPPORTED_MODEL_TYPES)})"
    )


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{source}: missing required key {key!r}")
    return hf[key]


def _opt_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    act = hf.get("activation_function", "relu")
    if act != "relu":
        raise ConfigError(f"{source}: OPT activation_function {act!r} is not supported (only 'relu')")
    if not hf.get("enable_bias", True):
        raise ConfigError(f"{source}: OPT with enable_bias=false is not supported")
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ConfigError(f"{source}: OPT with layer_norm_elementwise_affine=false is not supported")
    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    pre = bool(hf.get("do_layer_norm_before", True))
    return ModelConfig(
        family="opt",
        vocab_size=int(_require(hf, "vocab_size", source)),
        hidden_size=hidden,
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=int(_require(hf, "ffn_dim", source)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=1e-5,  # OPT's nn.LayerNorm default; the config does not carry it
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        model_type="opt",
        word_embed_proj_dim=int(hf.get("word_embed_proj_dim") or hidden),
        do_layer_norm_before=pre,
        final_layer_norm=pre and not bool(hf.get("_remove_final_layer_norm", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )


def _eos(v: Any) -> int | tuple[int, ...] | None:
    if isinstance(v, list):
        return tuple(int(x) for x in v)
    return v


def _rope_from_hf(hf: dict[str, Any], source: str) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs use rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        try:
            return RopeConfig(
                theta=theta,
                kind="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: llama3 rope scaling is missing {e.args[0]!r}") from e
    raise ConfigError(
        f"{source}: rope type {kind!r} is not supported (supported: default, linear, llama3)"
    )


# Per model_type: what transformers assumes when config.json omits a key, and the switches its
# modeling code fixes (Qwen2 always biases q/k/v and never o; Qwen3 always norms q and k; Mistral has
# no biases whatever the config says).
_LLAMA_LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "qwen2": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28},
    "qwen3": {"max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 28,
              "head_dim": 128},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}


def _switches(hf: dict[str, Any], model_type: str) -> dict[str, bool]:
    if model_type == "qwen2":
        return {"qkv_bias": True}
    if model_type == "mistral":
        return {}
    out = {"attention_bias": bool(hf.get("attention_bias", False))}
    if model_type == "qwen3":
        return {**out, "qk_norm": True}
    return {**out, "mlp_bias": bool(hf.get("mlp_bias", False))}


def _check_sliding_window(hf: dict[str, Any], source: str, model_type: str, layers: int, max_pos: int) -> None:
    """Sliding-window attention is not implemented (neither in the reference nor in the Pallas
    kernels): refuse a config whose window is shorter than the context, rather than serve it as full
    attention, silently wrong past the window. Mistral slides whenever ``sliding_window`` is set; Qwen2
    and Qwen3 only with ``use_sliding_window`` and then on the layers ``layer_types`` (or
    ``max_window_layers``) names, as transformers reads them."""
    window = hf.get("sliding_window", _LLAMA_LAYOUT_DEFAULTS[model_type].get("sliding_window"))
    if model_type in ("qwen2", "qwen3"):
        types = hf.get("layer_types")
        full_layers = int(hf.get("max_window_layers", _LLAMA_LAYOUT_DEFAULTS[model_type]["max_window_layers"]))
        used = bool(hf.get("use_sliding_window", False)) and (
            "sliding_attention" in types if types is not None else full_layers < layers)
    else:
        used = model_type == "mistral"
    if used and window is not None and int(window) < max_pos:
        raise ConfigError(
            f"{source}: sliding_window={window} is shorter than the context (max_position_embeddings="
            f"{max_pos}); sliding-window attention is not supported (a null sliding_window, or one of at "
            f"least max_position_embeddings, serves as full attention)"
        )


def _llama_from_hf(hf: dict[str, Any], source: str, model_type: str = "llama") -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: {model_type} hidden_act {act!r} is not supported (only 'silu')")
    if int(hf.get("pretraining_tp", 1)) != 1:
        raise ConfigError(f"{source}: pretraining_tp != 1 is not supported")
    defaults = _LLAMA_LAYOUT_DEFAULTS[model_type]
    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    layers = int(_require(hf, "num_hidden_layers", source))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or defaults.get("head_dim") or hidden // heads)
    max_pos = int(hf.get("max_position_embeddings") or defaults["max_position_embeddings"])
    _check_sliding_window(hf, source, model_type, layers, max_pos)
    return ModelConfig(
        family="llama",
        vocab_size=int(_require(hf, "vocab_size", source)),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_require(hf, "intermediate_size", source)),
        max_position_embeddings=max_pos,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=_rope_from_hf(hf, source),
        model_type=model_type,
        **_switches(hf, model_type),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
