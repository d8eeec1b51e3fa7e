"""The weights as the model functions take them: the checkpoint's tensors (:mod:`.params`), with the
projections that read the same input and are split alike over tensor parallelism stacked into one.

Why: at decode a projection is a matrix-vector product per row, bound by reading its weight, and a
small one is mostly fixed cost. LLaMA-3-8B's K and V projections (8 MB each) ran as two reductions
at about 0.8 TB/s on an H200, and even stacked (16 MB, 2048 columns) XLA still ran them as one
reduction beside the query's matmul. So the query, key and value projections become one
``attn.wqkv`` ``[D, KVH, G + 2, Dh]``: for each KV head, the G query heads that attend to it, then its
K, then its V. Sharding that tensor over its KV-head axis gives each device its query heads and
their KV heads, exactly the slices the separate tensors gave it, so it applies wherever the mesh
splits the query and the KV heads alike (one device, or a tensor-parallel degree that divides the KV
heads). Where it does not (more devices than KV heads: the query heads split, the KV heads
replicated), the query projection stays apart and K and V stack into ``attn.wkv`` ``[D, 2, KVH, Dh]``.
The MLP's gate and up projections likewise become one ``[D, 2, F]``, split over the FFN columns.

Stacking happens once, where an instance places its weights; checkpoints, the converter and random
initialisation keep the checkpoint layout. :func:`project_qkv` is the one place the model functions
read either attention layout.
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


def _split_like(a: Any, b: Any) -> bool:
    """Whether two head-major tensors (heads on axis 1) are split over the mesh the same way."""
    return _head_axis(a) == _head_axis(b)


def _head_axis(x: Any) -> Any:
    """The mesh axis that splits ``x``'s axis 1; None for host arrays and unsplit ones."""
    sharding = x.sharding if isinstance(x, jax.Array) else None
    if not isinstance(sharding, NamedSharding):
        return None
    return (tuple(sharding.spec) + (None, None))[1]


def fuse_qkv(q: Any, k: Any, v: Any, groups: int) -> Any:
    """``[D, H, Dh]``, ``[D, KVH, Dh]`` twice (or the biases without D) as ``[D, KVH, G + 2, Dh]``: each
    KV head's query heads, its K, its V. Placed as the inputs are: a KV-head split stays a split."""
    lead = q.ndim - 2  # 1 for weights, 0 for biases
    sharding = q.sharding if isinstance(q, jax.Array) else None
    if not isinstance(sharding, NamedSharding):
        return _fuse(q, k, v, groups, lead)
    spec = list(sharding.spec) + [None] * (q.ndim - len(sharding.spec))
    out = PartitionSpec(*spec[: lead + 1], None, *spec[lead + 1 :])
    return _fuser(groups, lead, NamedSharding(sharding.mesh, out))(q, k, v)


def _fuse(q: Any, k: Any, v: Any, groups: int, lead: int) -> Any:
    kvh = k.shape[lead]
    qg = jnp.reshape(q, (*q.shape[:lead], kvh, groups, q.shape[-1]))
    return jnp.concatenate([qg, jnp.expand_dims(k, lead + 1), jnp.expand_dims(v, lead + 1)], axis=lead + 1)


@functools.lru_cache(maxsize=64)
def _fuser(groups: int, lead: int, out: NamedSharding) -> Any:
    """One jitted fusion per shape class and placement: every layer after the first reuses it."""
    return jax.jit(lambda q, k, v: _fuse(q, k, v, groups, lead), out_shardings=out)


def serving_layer(lp: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    """One layer's tensors in the serving layout: ``attn.wqkv`` ``[D, KVH, G + 2, Dh]`` (and
    ``attn.bqkv`` ``[KVH, G + 2, Dh]`` where q/k/v have biases) where the query and KV heads are split
    alike, else ``attn.wq`` as it is and ``attn.wkv`` ``[D, 2, KVH, Dh]`` (``attn.bkv``); for the gated
    MLPs ``mlp.w_gate_up`` ``[D, 2, F]`` (and ``mlp.b_gate_up``) for ``w_gate``/``w_up``. The rest as it is."""
    a = dict(lp["attn"])
    biased = cfg.family == "opt" or cfg.has_qkv_bias
    groups = cfg.num_heads // cfg.num_kv_heads
    if _split_like(a["wq"], a["wk"]):
        a["wqkv"] = fuse_qkv(a.pop("wq"), a.pop("wk"), a.pop("wv"), groups)
        if biased:
            a["bqkv"] = fuse_qkv(a.pop("bq"), a.pop("bk"), a.pop("bv"), groups)
    else:
        a["wkv"] = stack([a.pop("wk"), a.pop("wv")], 1)
        if biased:
            a["bkv"] = stack([a.pop("bk"), a.pop("bv")], 0)
    out = {**lp, "attn": a}
    if cfg.family != "opt":
        m = dict(lp["mlp"])
        m["w_gate_up"] = stack([m.pop("w_gate"), m.pop("w_up")], 1)
        if cfg.mlp_bias:
            m["b_gate_up"] = stack([m.pop("b_gate"), m.pop("b_up")], 0)
        out["mlp"] = m
    return out


def project_qkv(a: dict[str, Any], h: jax.Array, biased: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q ``[T, H, Dh]``, k and v ``[T, KVH, Dh]`` of the normed input ``h`` ``[T, D]``, from either
    attention layout :func:`serving_layer` leaves (the layout is the tree's structure, fixed per stage)."""
    if "wqkv" in a:
        qkv = jnp.einsum("td,dcgk->tcgk", h, a["wqkv"])
        if biased:
            qkv = qkv + a["bqkv"]
        g = qkv.shape[2] - 2
        q = qkv[:, :, :g].reshape(qkv.shape[0], -1, qkv.shape[3])
        return q, qkv[:, :, g], qkv[:, :, g + 1]
    q = jnp.einsum("td,dhk->thk", h, a["wq"])
    kv = jnp.einsum("td,dchk->tchk", h, a["wkv"])
    if biased:
        q, kv = q + a["bq"], kv + a["bkv"]
    return q, kv[:, 0], kv[:, 1]


def serving_params(params: Params, cfg: ModelConfig) -> Params:
    """The params pytree in the serving layout (a new tree; ``params`` is left as it was)."""
    return {**params, "layers": [serving_layer(lp, cfg) for lp in params["layers"]]}
