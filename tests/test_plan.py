"""The placement plan (distllm_jax.placement.plan): the file the search and the benchmark write reads back
as it was written, bad fields are named, and the one plan feeds the engine, the simulator and the
cluster's placement."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from distllm_jax.placement.latency import Fit, Profile
from distllm_jax.placement.plan import Plan, PlanInstance
from distllm_jax.placement.search import Cluster, algorithm1, algorithm2, colocated_search, workload_from
from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.simulator import SimConfig

REPO = Path(__file__).resolve().parents[1]
FITS = {1: Fit((60.0, 0, 0), (20.0, 0, 0), (20.0, 0, 0)), 2: Fit((20.0, 0, 0), (13.3, 0, 0), (13.3, 0, 0))}


def profile() -> Profile:
    return Profile("toy", "toy", FITS, params_bytes=1e9, kv_bytes_per_token=1e6, gpu_memory_bytes=80e9, num_layers=8)


@pytest.fixture(scope="module")
def searched() -> dict[str, Plan]:
    prof, wl = profile(), workload_from([(64, 8)] * 50, 200)
    return {"algorithm1": algorithm1(prof, wl, (0.2, 0.1), Cluster(1, 8), rate=10.0, max_decode_batch=4),
            "algorithm2": algorithm2(prof, wl, (0.2, 0.1), Cluster(1, 4), rate=5.0, max_decode_batch=4),
            "colocated": colocated_search(prof, wl, (0.2, 0.1), Cluster(1, 4), rate=5.0, max_decode_batch=4)}


@pytest.mark.parametrize("name", ["algorithm1", "algorithm2", "colocated"])
def test_a_searched_plan_is_written_as_before_and_reads_back(searched, name, tmp_path):
    plan = searched[name]
    d = plan.to_dict()
    # the file format distllm place always wrote (Plan.to_json of placement.search before the move)
    want = {"mode": plan.mode, "algorithm": plan.algorithm, "expected_goodput": plan.expected_goodput,
            "per_gpu_goodput": plan.expected_goodput / plan.gpus, "gpus": plan.gpus, "detail": plan.detail}
    for k in ("prefill", "decode", "colocated"):
        if getattr(plan, k):
            want[k] = [{"tp": i.tp, "pp": i.pp} for i in getattr(plan, k)]
    assert d == want and list(d) == list(want)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert json.loads((tmp_path / "plan.json").read_text()) == d
    assert Plan.load(tmp_path / "plan.json").pairs_on_same_node == (name == "algorithm2")


def test_the_benchmarks_plan_file_round_trips_exactly():
    path = REPO / "bench/results/multi-gpu-cpu/plan-cpux8-tiny-opt.json"
    plan = Plan.load(path)
    assert plan.mode == "disaggregated" and plan.gpus == 8 and not plan.pairs_on_same_node
    assert plan.to_dict() == json.loads(path.read_text())


def test_a_hand_written_plan_keeps_what_it_says():
    d = {"prefill": [{"tp": 2, "node": "10.0.0.5"}, {}], "decode": [{"pp": 2}, {"tp": 1, "pp": 1}],
         "same_node": False, "prefill_token_budget": 256, "max_decode_batch": 16}
    plan = Plan.from_dict(d)
    assert plan.mode == "disaggregated" and plan.prefill == (PlanInstance(2, 1, "10.0.0.5"), PlanInstance())
    assert plan.decode == (PlanInstance(1, 2), PlanInstance()) and plan.gpus == 6
    assert plan.expected_goodput is None and plan.per_gpu_goodput is None
    # written back: defaults spelled out, the derived GPU count added, nothing else
    assert plan.to_dict() == {"mode": "disaggregated", "gpus": 6,
                              "prefill": [{"tp": 2, "pp": 1, "node": "10.0.0.5"}, {"tp": 1, "pp": 1}],
                              "decode": [{"tp": 1, "pp": 2}, {"tp": 1, "pp": 1}],
                              "prefill_token_budget": 256, "max_decode_batch": 16, "same_node": False}
    assert Plan.from_dict(plan.to_dict()) == plan
    # derived fields are ignored when read; null lists are empty
    assert Plan.from_dict({"mode": "colocated", "colocated": [{"tp": 2}], "gpus": 99, "per_gpu_goodput": 1,
                           "prefill": None}).gpus == 2


@pytest.mark.parametrize("d,message", [
    ([], "plan: a plan is a JSON object, got list"),
    ({"mode": "pipelined", "colocated": [{}]}, "plan: mode must be one of ('disaggregated', 'colocated', 'chunked')"),
    ({"prefill": [{}]}, "plan: disaggregated mode needs at least one instance in decode"),
    ({"mode": "chunked", "prefill": [{}], "decode": [{}]}, "plan: chunked mode needs at least one instance in colocated"),
    ({"prefill": [{}], "decode": [{}], "max_decode_batchs": 8}, "plan: unknown field 'max_decode_batchs'"),
    ({"prefill": [{"tp": 2, "gpus": 2}], "decode": [{}]}, "plan: prefill[0]: unknown field 'gpus'"),
    ({"prefill": [{}, {"tp": 0}], "decode": [{}]}, "plan: prefill[1].tp must be a positive integer, got 0"),
    ({"prefill": [{}], "decode": [{"pp": "2"}]}, "plan: decode[0].pp must be a positive integer, got '2'"),
    ({"prefill": [{}], "decode": ["tp2"]}, "plan: decode[0] must be an object"),
    ({"prefill": {"tp": 2}, "decode": [{}]}, "plan: prefill must be a list of instances"),
    ({"prefill": [{}], "decode": [{}], "max_decode_batch": 0}, "plan: max_decode_batch must be a positive integer"),
    ({"prefill": [{}], "decode": [{}], "prefill_token_budget": True}, "plan: prefill_token_budget must be a positive"),
    ({"prefill": [{}], "decode": [{}], "same_node": "yes"}, "plan: same_node must be true or false, got 'yes'"),
    ({"prefill": [{}], "decode": [{}], "expected_goodput": "4"}, "plan: expected_goodput must be a number"),
    ({"prefill": [{}], "decode": [{}], "detail": []}, "plan: detail must be an object"),
    ({"prefill": [{"node": 3}], "decode": [{}]}, "plan: prefill[0].node must be a node id or IP address, got 3"),
    ({"same_node": True, "prefill": [{}, {}], "decode": [{}]},
     "plan: same_node pairs prefill i with decode i, but there are 2 prefill and 1 decode instances"),
    ({"algorithm": "algorithm2-low-affinity", "prefill": [{"node": "a"}], "decode": [{"node": "b"}]},
     "plan: same_node, but prefill[0] is pinned to a and decode[0] to b"),
])
def test_a_bad_plan_names_its_field(d, message):
    with pytest.raises(ValueError) as e:
        Plan.from_dict(d)
    assert message in str(e.value)


def test_load_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"prefill": [{"tp": 2}], "decode": [{"tp": -1}]}')
    with pytest.raises(ValueError, match=rf"plan {bad}: decode\[0\].tp must be a positive integer"):
        Plan.load(bad)
    bad.write_text('{"same_node": true, "prefill": [{}, {}], "decode": [{}]}')
    with pytest.raises(ValueError, match=rf"plan {bad}: same_node pairs"):
        Plan.load(bad)
    bad.write_text("{mode: colocated}")
    with pytest.raises(ValueError, match=rf"plan {bad}: not JSON"):
        Plan.load(bad)


def test_to_engine_config():
    plan = Plan.from_dict({"prefill": [{"tp": 2}], "decode": [{"tp": 1, "pp": 2}, {}], "max_decode_batch": 8})
    ecfg = plan.to_engine_config(page_size=8, num_pages=64, max_decode_batch=32, prefill_token_budget=128)
    assert ecfg.mode == "disaggregated" and ecfg.num_devices == 5
    assert [(r, s.tp, s.pp) for r, s in ecfg.instances()] == [("prefill", 2, 1), ("decode", 1, 2), ("decode", 1, 1)]
    assert (ecfg.max_decode_batch, ecfg.prefill_token_budget, ecfg.page_size) == (8, 128, 8)  # the plan's limit wins
    co = Plan("chunked", colocated=(PlanInstance(2),)).to_engine_config(progress=False)
    assert co.mode == "chunked" and [s.tp for _, s in co.instances()] == [2]


def test_to_sim_config():
    plan = Plan.from_dict({"prefill": [{"tp": 2}], "decode": [{"pp": 2}], "prefill_token_budget": 256})
    cfg = plan.to_sim_config(admission_s=0.01, prefill_token_budget=512, batch_buckets=(1, 2))
    assert cfg == SimConfig("disaggregated", prefill=(InstanceSpec(2, 1),), decode=(InstanceSpec(1, 2),),
                            prefill_token_budget=256, admission_s=0.01, batch_buckets=(1, 2))
    co = Plan("colocated", colocated=(PlanInstance(1),) * 2)
    vllm = co.to_sim_config("vllm")
    assert vllm.colocated == (InstanceSpec(1, 1),) * 2 and vllm.max_decode_batch == 1024  # the system's policies
    with pytest.raises(ValueError, match="system 'vllm' runs colocated, not disaggregated"):
        plan.to_sim_config("vllm")


def test_the_server_and_the_cluster_read_one_plan(tmp_path):
    from serve.cli import cluster_config, engine_config

    path = tmp_path / "plan.json"
    Plan("disaggregated", (PlanInstance(1, node="n1"),), (PlanInstance(2),), algorithm="algorithm2-low-affinity",
         max_decode_batch=4).save(path)
    ns = argparse.Namespace(plan=str(path), page_size=16, num_pages=64, max_seq_len=None, prefill_token_budget=512,
                            max_decode_batch=32, kv_transfer="local", dtype=None, quiet=True, cluster="auto",
                            kv_admission="on-demand", preemption="recompute", kv_watermark=0.01, prefix_cache=False,
                            prefill_routing="auto", compile_threads=0, cluster_kv_path="auto")
    ecfg = engine_config(ns, 8)
    assert [(r, s.tp) for r, s in ecfg.instances()] == [("prefill", 1), ("decode", 2)] and ecfg.max_decode_batch == 4
    placement = cluster_config(ns).placement
    assert (placement.prefill, placement.decode, placement.same_node) == (("n1",), (None,), True)
    path.write_text(json.dumps({"prefill": [{}], "decode": [{}], "prefil_token_budget": 64}))
    with pytest.raises(ValueError, match="unknown field 'prefil_token_budget'"):
        engine_config(ns, 8)
