"""The serving layout fuses q/k/v (or stacks K/V) and gate/up without changing a value, and keeps each
shard where it was: a tensor-parallel stage holds the same slices before and after."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from distllm_jax.engine.params_source import RandomSource
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.presets import preset
from distllm_jax.models.serving_layout import project_qkv, serving_layer, serving_params
from distllm_jax.parallel import make_mesh


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_fused_qkv_holds_the_parts_in_order(name):
    cfg = ModelConfig.from_hf_dict(preset(name))
    src = RandomSource(cfg, "float32", seed=3)
    mesh = make_mesh(jax.devices()[:2])
    params = src.load(mesh, {s for s in _names(cfg)})
    served = serving_params(params, cfg)
    a, sa = params["layers"][1]["attn"], served["layers"][1]["attn"]
    G, K = cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads
    assert not {"wq", "wk", "wv", "wkv"} & set(sa)
    w = np.asarray(sa["wqkv"])
    assert w.shape == (cfg.hidden_size, K, G + 2, cfg.head_dim)
    # query head h attends to KV head h // G: it sits in that KV head's group, at h % G
    np.testing.assert_array_equal(w[:, :, :G].reshape(a["wq"].shape), np.asarray(a["wq"]))
    np.testing.assert_array_equal(w[:, :, G], np.asarray(a["wk"]))
    np.testing.assert_array_equal(w[:, :, G + 1], np.asarray(a["wv"]))
    # the KV heads axis is split over the mesh before and after: each device keeps its heads
    assert a["wk"].sharding.spec[1] == "tp" and sa["wqkv"].sharding.spec[1] == "tp"
    for shard, wq, wk in zip(*(sorted(t.addressable_shards, key=lambda s: s.device.id)
                               for t in (sa["wqkv"], a["wq"], a["wk"]))):
        np.testing.assert_array_equal(np.asarray(shard.data)[:, :, :G].reshape(wq.data.shape), np.asarray(wq.data))
        np.testing.assert_array_equal(np.asarray(shard.data)[:, :, G], np.asarray(wk.data))
    if cfg.family == "opt":
        b = np.asarray(sa["bqkv"])
        np.testing.assert_array_equal(b[:, :G].reshape(a["bq"].shape), np.asarray(a["bq"]))
        np.testing.assert_array_equal(b[:, G + 1], np.asarray(a["bv"]))
        assert served["layers"][1]["mlp"] is params["layers"][1]["mlp"]
    else:
        m, sm = params["layers"][0]["mlp"], served["layers"][0]["mlp"]
        assert set(sm) == {"w_gate_up", "w_down"}
        np.testing.assert_array_equal(np.asarray(sm["w_gate_up"][:, 0]), np.asarray(m["w_gate"]))
        np.testing.assert_array_equal(np.asarray(sm["w_gate_up"][:, 1]), np.asarray(m["w_up"]))
        assert sm["w_gate_up"].sharding.spec[2] == "tp"
    assert "wk" in params["layers"][1]["attn"]  # the checkpoint-layout tree is left as it was


def test_query_apart_where_only_the_query_heads_split():
    """More devices than KV heads: the query heads split, the KV heads replicate, so no one tensor
    could hold both as each device needs them; q stays apart and K/V stack."""
    cfg = ModelConfig.from_hf_dict(preset("tiny-llama"))
    tp = next(t for t in (2, 4, 8) if cfg.num_kv_heads % t and not cfg.num_heads % t)
    mesh = make_mesh(jax.devices()[:tp])
    params = RandomSource(cfg, "float32", seed=3).load(mesh, set(_names(cfg)))
    a, sa = params["layers"][0]["attn"], serving_params(params, cfg)["layers"][0]["attn"]
    assert "wqkv" not in sa and sa["wq"] is a["wq"] and sa["wq"].sharding.spec[1] == "tp"
    np.testing.assert_array_equal(np.asarray(sa["wkv"][:, 1]), np.asarray(a["wv"]))
    assert tuple(sa["wkv"].sharding.spec) in ((), (None,) * 4)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_both_layouts_give_the_same_projections(tp):
    cfg = ModelConfig.from_hf_dict(preset("tiny-llama"))
    params = RandomSource(cfg, "float32", seed=5).load(make_mesh(jax.devices()[:tp]), set(_names(cfg)))
    a = params["layers"][0]["attn"]
    h = np.random.default_rng(0).standard_normal((3, cfg.hidden_size)).astype(np.float32)
    got = project_qkv(serving_layer(params["layers"][0], cfg)["attn"], h, biased=False)
    want = (np.einsum("td,dhk->thk", h, a["wq"]), np.einsum("td,dhk->thk", h, a["wk"]),
            np.einsum("td,dhk->thk", h, a["wv"]))
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5)


def test_layer_on_host_arrays():
    cfg = ModelConfig.from_hf_dict(preset("tiny-llama"))
    D, K, Dh, F, H = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.num_heads
    lp = {"attn": {"wq": np.ones((D, H, Dh)), "wk": np.zeros((D, K, Dh)), "wv": np.full((D, K, Dh), 2.0)},
          "mlp": {"w_gate": np.zeros((D, F)), "w_up": np.ones((D, F)), "w_down": np.ones((F, D))}}
    out = serving_layer(lp, cfg)
    w = out["attn"]["wqkv"]
    assert w.shape == (D, K, H // K + 2, Dh) and float(w[:, :, -1].min()) == 2.0 and float(w[:, :, -2].max()) == 0.0
    assert out["mlp"]["w_gate_up"].shape == (D, 2, F)


def _names(cfg):
    from distllm_jax.models.params import tensor_specs

    return [s.name for s in tensor_specs(cfg)]
