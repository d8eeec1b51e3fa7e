"""Restore onto a tensor-parallel mesh (8 virtual CPU devices): same logits and tokens as one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from distllm_jax.checkpoint import restore_params
from distllm_jax.parallel import kv_pool_sharding, make_mesh, split_devices
from hf_models import NEW_FAMILIES
from model_runner import greedy_generate

VARIANTS = ("opt-pre-ln", "llama-gqa-llama3", *NEW_FAMILIES)
PROMPTS = [[5, 9, 23, 7, 1, 100, 42], [3, 4, 8], [77, 12, 15, 19, 21, 2, 8, 9, 11, 200, 201]]


@pytest.fixture(scope="module")
def baseline(converted):
    out = {}

    def get(variant):
        if variant not in out:
            _, ckpt = converted(variant)
            cfg, params = restore_params(ckpt)
            out[variant] = greedy_generate(params, cfg, PROMPTS, 8, return_prefill_logits=True)
        return out[variant]

    return get


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_tp_restore_same_logits(converted, baseline, variant, tp):
    assert jax.device_count() == 8
    _, ckpt = converted(variant)
    # use the *last* devices: a mesh disjoint from the default device, as a decode instance would be
    mesh = make_mesh(split_devices([8 - tp, tp])[1])
    cfg, params = restore_params(ckpt, mesh=mesh)
    wq = params["layers"][0]["attn"]["wq"]
    assert wq.sharding.mesh.devices.size == tp
    assert set(wq.sharding.device_set) == set(mesh.devices.flat)
    # heads really are split: each device holds 1/tp of the heads
    assert wq.addressable_shards[0].data.shape[1] == cfg.num_heads // tp
    attn = params["layers"][0]["attn"]
    if cfg.has_qkv_bias:  # biases split like their weights
        assert attn["bq"].addressable_shards[0].data.shape[0] == cfg.num_heads // tp
        assert attn["bk"].sharding.is_fully_replicated == (cfg.num_kv_heads % tp != 0)
    if cfg.qk_norm:  # one scale per head dimension: replicated
        assert attn["q_norm"].sharding.is_fully_replicated and attn["k_norm"].sharding.is_fully_replicated
    tokens, logits = greedy_generate(
        params, cfg, PROMPTS, 8, kv_sharding=kv_pool_sharding(cfg, mesh), return_prefill_logits=True
    )
    ref_tokens, ref_logits = baseline(variant)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    assert tokens == ref_tokens


def test_split_devices_disjoint():
    a, b = split_devices([2, 4])
    assert not set(a) & set(b)
    with pytest.raises(ValueError, match="only 8"):
        split_devices([4, 5])


def test_device_random_source_same_model_under_any_split():
    """Real-size random weights are drawn on the devices (performance work): the same seed must give
    the same tensors whether an instance loads them on one device, sharded over two, or per pipeline
    stage, and a different seed must give different ones."""
    from distllm_jax.engine import DeviceRandomSource
    from distllm_jax.engine.params_source import stage_tensor_names
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset

    cfg = ModelConfig.from_hf_dict(preset("tiny-llama"))
    src = DeviceRandomSource(cfg, "float32", seed=3)
    names = stage_tensor_names(cfg, 0, cfg.num_layers, True, True)
    one = src.load(make_mesh(jax.devices()[:1]), names)
    two = src.load(make_mesh(jax.devices()[1:3]), names)
    stage = src.load(make_mesh(jax.devices()[3:4]), stage_tensor_names(cfg, 1, cfg.num_layers, False, True))
    leaves1, leaves2 = jax.tree.leaves(one), jax.tree.leaves(two)
    assert len(leaves1) == len(leaves2) > 0
    for a, b in zip(leaves1, leaves2):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(len(a.sharding.device_set) == 2 and not a.sharding.is_fully_replicated for a in leaves2)
    np.testing.assert_array_equal(np.asarray(stage["layers"][1]["mlp"]["w_up"]), np.asarray(one["layers"][1]["mlp"]["w_up"]))
    w = np.asarray(one["layers"][0]["attn"]["wq"])
    assert 0.015 < w.std() < 0.025
    other = DeviceRandomSource(cfg, "float32", seed=4).load(make_mesh(jax.devices()[:1]), names)
    assert not np.array_equal(np.asarray(other["layers"][0]["attn"]["wq"]), w)
