"""Device meshes and the sharding rules for params and the KV pool.

An instance's mesh has a ``tp`` axis (tensor parallelism over attention heads, FFN columns, vocab).
A tensor axis is sharded only when the mesh axis divides it; otherwise the tensor is replicated, which
is always correct (jit inserts the collectives) and only costs memory.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from distllm_jax.models.config import ModelConfig
from distllm_jax.models.params import TensorSpec, tensor_specs, unflatten

TP = "tp"


def make_mesh(devices: Sequence[jax.Device] | None = None, tp: int | None = None) -> Mesh:
    """A 1-D tensor-parallel mesh over ``devices`` (default: the first ``tp`` local devices)."""
    if devices is None:
        all_devs = jax.devices()
        tp = tp or len(all_devs)
        if tp > len(all_devs):
            raise ValueError(f"tensor parallelism {tp} needs {tp} devices, only {len(all_devs)} present")
        devices = all_devs[:tp]
    if tp is not None and tp != len(devices):
        raise ValueError(f"tp={tp} but {len(devices)} devices were given")
    return Mesh(np.asarray(devices), (TP,))


def split_devices(counts: Sequence[int], devices: Sequence[jax.Device] | None = None) -> list[list[jax.Device]]:
    """Disjoint consecutive device groups of the given sizes (e.g. prefill and decode meshes)."""
    devices = list(devices if devices is not None else jax.devices())
    if sum(counts) > len(devices):
        raise ValueError(f"asked for {sum(counts)} devices ({list(counts)}), only {len(devices)} present")
    out, i = [], 0
    for c in counts:
        out.append(devices[i : i + c])
        i += c
    return out


def spec_partition(spec: TensorSpec, mesh: Mesh) -> P:
    tp = mesh.shape.get(TP, 1)
    if spec.tp_axis is None or tp == 1 or spec.shape[spec.tp_axis] % tp:
        return P()
    axes: list[Any] = [None] * len(spec.shape)
    axes[spec.tp_axis] = TP
    return P(*axes)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings in the params pytree structure."""
    return unflatten({s.name: NamedSharding(mesh, spec_partition(s, mesh)) for s in tensor_specs(cfg)}, cfg)


def _kv_heads_split(cfg: ModelConfig, mesh: Mesh) -> bool:
    tp = mesh.shape.get(TP, 1)
    return tp > 1 and cfg.num_kv_heads % tp == 0


def kv_pool_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """Each layer's pool array ``[pages, page_size, kv_heads, head_dim]`` is split over KV heads."""
    return NamedSharding(mesh, P(None, None, TP, None) if _kv_heads_split(cfg, mesh) else P())


def kv_buffer_sharding(cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """A migration buffer ``[layers, pages, page_size, kv_heads, head_dim]``, split like the pool."""
    return NamedSharding(mesh, P(None, None, None, TP, None) if _kv_heads_split(cfg, mesh) else P())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
