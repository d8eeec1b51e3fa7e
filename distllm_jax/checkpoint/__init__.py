"""HF safetensors -> orbax conversion (streaming) and restore with shardings."""

from distllm_jax.checkpoint.convert import ConvertReport, convert, write_random
from distllm_jax.checkpoint.orbax_store import read_config, read_meta, restore_params
from distllm_jax.checkpoint.safetensors_reader import CheckpointError

__all__ = [
    "CheckpointError",
    "ConvertReport",
    "convert",
    "read_config",
    "read_meta",
    "restore_params",
    "write_random",
]
