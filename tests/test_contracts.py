"""The written contracts hold: both instance kinds implement :class:`InstanceAPI`, and every KV path
implements :class:`KVPuller` (and :class:`StagedKVPuller` where it says ``staged``). Workers rely on
these members without asking which class they hold, so a member missing from one class would only
show as an AttributeError mid-serving."""

from __future__ import annotations

import typing

import jax
import pytest

from distllm_jax.cluster.kv_paths import RemoteKVPuller
from distllm_jax.cluster.remote import RemoteInstance
from distllm_jax.engine import EngineConfig, InstanceSpec, RandomSource
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.instance_api import InstanceAPI, LookaheadInstance
from distllm_jax.engine.transfer import KVPuller, LocalKVPuller, StagedKVPuller
from distllm_jax.engine.transfer_server import TransferServerPuller
from distllm_jax.models.attention import REFERENCE
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.presets import preset


def members(proto: type) -> set[str]:
    """What a Protocol (and the Protocols it extends) declares: annotated attributes and methods."""
    out: set[str] = set()
    for klass in proto.__mro__:
        if klass in (object, typing.Protocol, typing.Generic):
            continue
        out |= set(getattr(klass, "__annotations__", {}))
        out |= {n for n, v in vars(klass).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    return out


def missing(obj: object, proto: type) -> list[str]:
    return sorted(m for m in members(proto) if not hasattr(obj, m))


@pytest.fixture(scope="module")
def local_instance():
    cfg = ModelConfig.from_hf_dict(preset("tiny-opt"))
    ecfg = EngineConfig(page_size=4, num_pages=16, max_seq_len=32, max_decode_batch=2, progress=False)
    return Instance("d", "decode", InstanceSpec(1), jax.devices()[:1], RandomSource(cfg), ecfg, REFERENCE)


def remote_instance() -> RemoteInstance:
    info = {"page_size": 4, "num_pages": 16, "max_batch": 2, "max_prefill_seqs": 1, "devices": ["cpu:0"],
            "stage_ranges": [[0, 2]], "attention": "reference", "num_programs": 0, "prefix_cache": False}
    return RemoteInstance("d", "decode", InstanceSpec(1), actor=None, info=info)


def test_both_instances_implement_the_instance_api(local_instance):
    assert missing(local_instance, InstanceAPI) == []
    assert missing(remote_instance(), InstanceAPI) == []
    assert local_instance.lookahead and missing(local_instance, LookaheadInstance) == []
    assert not remote_instance().lookahead  # so no worker calls dispatch_decode on it


@pytest.mark.parametrize("puller", [LocalKVPuller(16), RemoteKVPuller("staged", 16)], ids=["local", "remote"])
def test_every_kv_path_implements_the_puller_api(puller):
    assert missing(puller, KVPuller) == []
    if puller.staged:
        assert missing(puller, StagedKVPuller) == []


def test_the_transfer_server_path_declares_itself_whole():
    assert not TransferServerPuller.staged
    assert {"kind", "staged", "pull", "warmup"} <= set(dir(TransferServerPuller))


def test_the_check_sees_a_missing_member():
    class Half:
        kind, staged = "half", True

        def pull(self, *a):
            return None

    assert missing(Half(), StagedKVPuller) == ["buckets", "put", "stage", "warmup"]
