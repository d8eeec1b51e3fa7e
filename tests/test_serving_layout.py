"""The serving layout stacks K/V and gate/up without changing a value, and keeps each shard where it
was: a tensor-parallel stage holds the same slices before and after."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from distllm_jax.engine.params_source import RandomSource
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.presets import preset
from distllm_jax.models.serving_layout import serving_layer, serving_params
from distllm_jax.parallel import make_mesh


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_stacked_tensors_hold_the_parts_in_order(name):
    cfg = ModelConfig.from_hf_dict(preset(name))
    src = RandomSource(cfg, "float32", seed=3)
    mesh = make_mesh(jax.devices()[:2])
    params = src.load(mesh, {s for s in _names(cfg)})
    served = serving_params(params, cfg)
    a, sa = params["layers"][1]["attn"], served["layers"][1]["attn"]
    assert "wk" not in sa and "wv" not in sa and sa["wkv"].shape == (a["wk"].shape[0], 2, *a["wk"].shape[1:])
    np.testing.assert_array_equal(np.asarray(sa["wkv"][:, 0]), np.asarray(a["wk"]))
    np.testing.assert_array_equal(np.asarray(sa["wkv"][:, 1]), np.asarray(a["wv"]))
    np.testing.assert_array_equal(np.asarray(sa["wq"]), np.asarray(a["wq"]))  # untouched
    # the KV heads axis is split over the mesh before and after: each device keeps its heads
    assert a["wk"].sharding.spec[1] == "tp" and sa["wkv"].sharding.spec[2] == "tp"
    for shard, part in zip(sorted(sa["wkv"].addressable_shards, key=lambda s: s.device.id),
                           sorted(a["wk"].addressable_shards, key=lambda s: s.device.id)):
        np.testing.assert_array_equal(np.asarray(shard.data)[:, 0], np.asarray(part.data))
    if cfg.family == "opt":
        np.testing.assert_array_equal(np.asarray(sa["bkv"][1]), np.asarray(a["bv"]))
        assert served["layers"][1]["mlp"] is params["layers"][1]["mlp"]
    else:
        m, sm = params["layers"][0]["mlp"], served["layers"][0]["mlp"]
        assert set(sm) == {"w_gate_up", "w_down"}
        np.testing.assert_array_equal(np.asarray(sm["w_gate_up"][:, 0]), np.asarray(m["w_gate"]))
        np.testing.assert_array_equal(np.asarray(sm["w_gate_up"][:, 1]), np.asarray(m["w_up"]))
        assert sm["w_gate_up"].sharding.spec[2] == "tp"
    assert "wk" in params["layers"][1]["attn"]  # the checkpoint-layout tree is left as it was


def test_layer_on_host_arrays():
    cfg = ModelConfig.from_hf_dict(preset("tiny-llama"))
    D, K, Dh, F = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    lp = {"attn": {"wq": np.ones((D, cfg.num_heads, Dh)), "wk": np.zeros((D, K, Dh)), "wv": np.ones((D, K, Dh))},
          "mlp": {"w_gate": np.zeros((D, F)), "w_up": np.ones((D, F)), "w_down": np.ones((F, D))}}
    out = serving_layer(lp, cfg)
    assert out["attn"]["wkv"].shape == (D, 2, K, Dh) and float(out["attn"]["wkv"][:, 1].min()) == 1.0
    assert out["mlp"]["w_gate_up"].shape == (D, 2, F)


def _names(cfg):
    from distllm_jax.models.params import tensor_specs

    return [s.name for s in tensor_specs(cfg)]
