"""Model families as pure functions over a params pytree (see ``params.py`` for the layout)."""

from distllm_jax.models.config import ConfigError, ModelConfig, RopeConfig
from distllm_jax.models.decoder import DecodeBatch, MixedBatch, PrefillBatch

__all__ = [
    "ConfigError",
    "DecodeBatch",
    "MixedBatch",
    "ModelConfig",
    "PrefillBatch",
    "RopeConfig",
]
