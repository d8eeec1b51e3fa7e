"""Model families as pure functions over a params pytree (see ``params.py`` for the layout)."""

from distllm_jax.models.config import ConfigError, ModelConfig, RopeConfig
from distllm_jax.models.decoder import DecodeBatch, PrefillBatch, decode, prefill

__all__ = [
    "ConfigError",
    "DecodeBatch",
    "ModelConfig",
    "PrefillBatch",
    "RopeConfig",
    "decode",
    "prefill",
]
