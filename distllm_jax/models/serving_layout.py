"""The weights as the model functions take them: the checkpoint's tensors (:mod:`.params`), with the
projections that read the same input and are split alike over tensor parallelism stacked into one.

Why: at decode a projection is a matrix-vector product per row, bound by reading its weight, and a
small one is mostly fixed cost. LLaMA-3-8B's K and V projections (8 MB each) ran as two reductions
at about 0.8 TB/s on an H200, where one stacked ``[D, 2, KVH, Dh]`` weight is one matmul that reads
both at once; the MLP's gate and up projections likewise become one ``[D, 2, F]``. K and V shard over
the KV heads and gate and up over the FFN columns, identically, so the stacked tensor shards the same
axis and every device keeps exactly the slices it held. The query projection stays apart: its heads
shard on their own rule (a mesh can split the query heads and not the KV heads).

Stacking happens once, where an instance places its weights; checkpoints, the converter and random
initialisation keep the checkpoint layout.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from distllm_jax.models.config import ModelConfig
from distllm_jax.models.params import Params

def stack(arrays: Sequence[Any], axis: int) -> jax.Array:
    """``jnp.stack(arrays, axis)`` placed as the inputs are: a sharded input axis stays sharded."""
    first = arrays[0]
    sharding = first.sharding if isinstance(first, jax.Array) else None
    if not isinstance(sharding, NamedSharding):
        return jnp.stack(arrays, axis)
    spec = list(sharding.spec) + [None] * (first.ndim - len(sharding.spec))
    spec.insert(axis, None)
    return _stacker(axis, NamedSharding(sharding.mesh, PartitionSpec(*spec)))(*arrays)


@functools.lru_cache(maxsize=64)
def _stacker(axis: int, out: NamedSharding) -> Any:
    """One jitted stack per axis and placement: every layer after the first reuses its program."""
    return jax.jit(lambda *xs: jnp.stack(xs, axis), out_shardings=out)


def serving_layer(lp: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """One layer's tensors in the serving layout: ``attn.wkv`` ``[D, 2, KVH, Dh]`` (and ``attn.bkv``
    ``[2, KVH, Dh]`` where K and V have biases) for ``wk``/``wv``; for the gated MLPs ``mlp.w_gate_up``
    ``[D, 2, F]`` (and ``mlp.b_gate_up``) for ``w_gate``/``w_up``. The rest as it is."""
    a = dict(lp["attn"])
    a["wkv"] = stack([a.pop("wk"), a.pop("wv")], 1)
    if cfg.family == "opt" or cfg.has_qkv_bias:
        a["bkv"] = stack([a.pop("bk"), a.pop("bv")], 0)
    out = {**lp, "attn": a}
    if cfg.family != "opt":
        m = dict(lp["mlp"])
        m["w_gate_up"] = stack([m.pop("w_gate"), m.pop("w_up")], 1)
        if cfg.mlp_bias:
            m["b_gate_up"] = stack([m.pop("b_gate"), m.pop("b_up")], 0)
        out["mlp"] = m
    return out


def serving_params(params: Params, cfg: ModelConfig) -> Params:
    """The params pytree in the serving layout (a new tree; ``params`` is left as it was)."""
    return {**params, "layers": [serving_layer(lp, cfg) for lp in params["layers"]]}
