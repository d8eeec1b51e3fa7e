"""Where an instance's weights come from: a converted checkpoint, or random init from a config.

Each pipeline stage loads only the tensors it runs (its layers, plus the embedding and head on the
first and last stage), placed directly with the stage mesh's shardings.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Collection, Protocol

import jax
import numpy as np

from distllm_jax.models.config import ModelConfig
from distllm_jax.models.params import Params, random_tensor, tensor_specs, unflatten
from distllm_jax.parallel import spec_partition


class ParamSource(Protocol):
    cfg: ModelConfig
    dtype: str

    def load(self, mesh: jax.sharding.Mesh, names: Collection[str]) -> Params: ...


def stage_tensor_names(cfg: ModelConfig, lo: int, hi: int, first: bool, last: bool) -> set[str]:
    """Tensors a stage running layers [lo, hi) needs; the non-layer tensors go to both ends (the
    first embeds, the last applies the head, which may be the tied embedding)."""
    out = set()
    for spec in tensor_specs(cfg):
        if spec.name.startswith("layers."):
            if lo <= int(spec.name.split(".")[1]) < hi:
                out.add(spec.name)
        elif first or last:
            out.add(spec.name)
    return out


class CheckpointSource:
    def __init__(self, ckpt_dir: str | Path, dtype: str | None = None):
        from distllm_jax.checkpoint import read_meta

        self.ckpt_dir = Path(ckpt_dir)
        meta = read_meta(self.ckpt_dir)
        self.cfg = ModelConfig.from_dict(meta["model_config"])
        self.dtype = dtype or meta["dtype"]

    def load(self, mesh: jax.sharding.Mesh, names: Collection[str]) -> Params:
        from distllm_jax.checkpoint import restore_params

        return restore_params(self.ckpt_dir, mesh=mesh, dtype=self.dtype, names=names)[1]


class RandomSource:
    """Seeded random weights (the embedded default and performance work at real shapes): the same
    seed gives the same model however it is split into stages."""

    def __init__(self, cfg: ModelConfig, dtype: str = "float32", seed: int = 0, std: float = 0.02):
        self.cfg, self.dtype, self.seed, self.std = cfg, dtype, seed, std

    def load(self, mesh: jax.sharding.Mesh, names: Collection[str]) -> Params:
        flat = {spec.name: self._tensor(spec, jax.sharding.NamedSharding(mesh, spec_partition(spec, mesh)))
                for spec in tensor_specs(self.cfg) if spec.name in names}
        return unflatten(flat, self.cfg)

    def _tensor(self, spec: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        host = random_tensor(spec, self.seed, np.float32, self.std).astype(_np_dtype(self.dtype))
        return jax.device_put(host, sharding)


class DeviceRandomSource(RandomSource):
    """Seeded random weights drawn on the devices themselves (``jax.random``), for performance work at
    real sizes: a 13B model in seconds, where :class:`RandomSource`'s host draw takes minutes. Each
    tensor's key comes from its name and the draw is made for the whole tensor under its sharding
    (threefry is partitionable), so the model is the same however it is split into stages or shards.
    The values differ from :class:`RandomSource`'s (another generator)."""

    def __init__(self, cfg: ModelConfig, dtype: str = "bfloat16", seed: int = 0, std: float = 0.02):
        super().__init__(cfg, dtype, seed, std)

    def _tensor(self, spec: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        key = jax.random.fold_in(jax.random.PRNGKey(self.seed), _name_seed(spec.name))
        return _draw(sharding, spec.shape, self.dtype, spec.init, self.std)(key)


def _name_seed(name: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") & 0x7FFFFFFF


@functools.lru_cache(maxsize=None)
def _draw(sharding: jax.sharding.Sharding, shape: tuple[int, ...], dtype: str, init: str, std: float):
    import jax.numpy as jnp

    def draw(key: jax.Array) -> jax.Array:
        if init == "ones":
            return jnp.ones(shape, dtype)
        if init == "zeros":
            return jnp.zeros(shape, dtype)
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return jax.jit(draw, out_shardings=sharding)


def _np_dtype(name: str) -> Any:
    import ml_dtypes  # ships with jax

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
