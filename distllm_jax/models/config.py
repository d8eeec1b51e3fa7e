"""Model configuration, read from a Hugging Face ``config.json``.

One dataclass covers both families so the engine, the sharding rules and the converter never branch on
raw HF keys: every family difference the model math needs is an explicit field here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

Family = Literal["opt", "llama"]

SUPPORTED_ARCHITECTURES = {
    "OPTForCausalLM": "opt",
    "OPTModel": "opt",
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
}
SUPPORTED_MODEL_TYPES = {"opt": "opt", "llama": "llama"}


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
    # LLaMA only
    rope: RopeConfig | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
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
        family = _detect_family(hf, source)
        if family == "opt":
            return _opt_from_hf(hf, source)
        return _llama_from_hf(hf, source)

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


def _detect_family(hf: dict[str, Any], source: str) -> Family:
    archs = hf.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]  # type: ignore[return-value]
    mt = hf.get("model_type")
    if mt in SUPPORTED_MODEL_TYPES and not archs:
        return SUPPORTED_MODEL_TYPES[mt]  # type: ignore[return-value]
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


def _llama_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: LLaMA hidden_act {act!r} is not supported (only 'silu')")
    if int(hf.get("pretraining_tp", 1)) != 1:
        raise ConfigError(f"{source}: pretraining_tp != 1 is not supported")
    hidden = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    head_dim = int(hf.get("head_dim") or hidden // heads)
    return ModelConfig(
        family="llama",
        vocab_size=int(_require(hf, "vocab_size", source)),
        hidden_size=hidden,
        num_layers=int(_require(hf, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_require(hf, "intermediate_size", source)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope=_rope_from_hf(hf, source),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_eos(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
