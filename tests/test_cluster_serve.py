"""``distllm serve --cluster auto`` for real (a subprocess that starts its own local Ray cluster): the
mixed greedy batch through gRPC equals transformers' greedy tokens, ModelInfo and
the metrics show the actors, their nodes, devices and the KV path, and a prefill actor killed mid-run
(SIGKILL to its process) is replaced while every request still completes."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import time

import pytest

from distllm_jax.cluster import ClusterConfig, Placement
from distllm_jax.placement.plan import Plan
from engine_workload import hf_greedy, workload
from serve.client import Client
from server_proc import ServerProc, checkpoint_with_tokenizer

# A backstop only (pytest-timeout): every wait below has its own bound; this catches one it does not
# own (a hung gRPC call or Ray).
pytestmark = pytest.mark.timeout(1800)

VARIANT = "llama-gqa-llama3"
WORK = workload(32, seed=7)
PLAN = {"mode": "disaggregated", "prefill": [{"tp": 2, "pp": 1}, {"tp": 1, "pp": 2}], "decode": [{"tp": 2, "pp": 1}]}


LONG = [(p, 40) for p, _ in WORK]  # long enough that prefill memory holds requests for a while


@pytest.fixture(scope="module")
def expected(converted):
    """transformers' greedy tokens (prompts and outputs fit the server's 128-token context)."""
    model, _ = converted(VARIANT)
    return {k: [hf_greedy(model, p, n) for p, n in w] for k, w in (("mixed", WORK), ("long", LONG))}


def budget(server) -> float:
    """The bound on a wait for the server: a replacement compiles what the start-up compiled, on the
    same cores; five start-ups (plus a floor) leave room for the host slowing down meanwhile."""
    return 120 + 5 * server.ready_s


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    import ray

    _, ckpt = converted(VARIANT)
    tmp = tmp_path_factory.mktemp("cluster-serve")
    ip = ray.util.get_node_ip_address()
    plan = tmp / "plan.json"
    plan.write_text(json.dumps({**PLAN, "decode": [{**PLAN["decode"][0], "node": ip}]}))
    srv = ServerProc(checkpoint_with_tokenizer(ckpt, tmp / "ckpt"), "--cluster", "auto", "--plan", str(plan))
    srv.node_ip = ip
    yield srv
    assert srv.stop() == 0, "".join(srv.log[-30:])


def serve_all(server, work) -> list:
    with Client(server.address, timeout=budget(server)) as c, cf.ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda pn: c.complete(pn[0], max_tokens=pn[1], ignore_eos=True), work))


def cluster(server) -> dict:
    with Client(server.address, timeout=60) as c:
        return json.loads(c.model_info().engine_json)["cluster"]


def test_mixed_batch_through_grpc_equals_hf(server, expected):
    outs = serve_all(server, WORK)
    assert [o.token_ids for o in outs] == expected["mixed"]
    for o, (_, n) in zip(outs, WORK):
        assert o.finished.finish_reason == "length"
        if n > 1:
            assert o.finished.timings.migration_path == "transfer-server" and o.finished.timings.migration_s > 0
    assert {o.finished.timings.prefill_instance for o in outs} == {"prefill0", "prefill1"}


def test_model_info_and_metrics_show_the_layout(server):
    info = cluster(server)
    actors = {a["name"]: a for a in info["actors"]}
    assert sorted(actors) == ["decode0", "prefill0", "prefill1"]
    assert len({a["pid"] for a in actors.values()}) == 3 and os.getpid() not in {a["pid"] for a in actors.values()}
    assert all(len(a["devices"]) == 2 and a["alive"] for a in actors.values())
    assert actors["decode0"]["node_ip"] == server.node_ip  # the plan pinned it
    assert info["kv_path"] == "transfer-server" and info["nodes"] == 1
    assert server.metric("distllm_cluster_actor", instance="prefill1", role="prefill") == 1
    assert server.metric("distllm_kv_path", path="transfer-server") == 1


def test_killed_prefill_actor_is_replaced_and_nothing_is_lost(server, expected):
    victim = next(a for a in cluster(server)["actors"] if a["name"] == "prefill0")
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(serve_all, server, LONG)
        end = time.monotonic() + budget(server)
        while server.metric("distllm_kv_pages_used", instance="prefill0") == 0:  # it holds KV now
            assert time.monotonic() < end and not fut.done()
            time.sleep(0.002)
        os.kill(victim["pid"], signal.SIGKILL)
        outs = fut.result(timeout=budget(server))
    assert [o.token_ids for o in outs] == expected["long"]  # redone from the prompt where needed
    assert server.metric("distllm_requeued_requests_total") > 0
    end = time.monotonic() + budget(server)
    while (info := cluster(server))["replacements"] < 1 or info["replacing"]:
        assert time.monotonic() < end, info
        time.sleep(0.2)
    new = next(a for a in info["actors"] if a["name"] == "prefill0")
    assert new["alive"] and new["pid"] != victim["pid"] and info["lost"] == []
    assert server.metric("distllm_actor_replacements_total") == 1
    assert server.metric("distllm_kv_pages_used") == 0
    assert [o.token_ids for o in serve_all(server, WORK)] == expected["mixed"]


def test_cluster_config_is_checked():
    with pytest.raises(ValueError, match="kv_path must be one of"):
        ClusterConfig(kv_path="nvlink")
    with pytest.raises(ValueError, match="address is empty"):
        ClusterConfig(address="")
    with pytest.raises(ValueError, match="platform"):
        ClusterConfig(platform="tpu")


def test_plan_placement_is_checked():
    # the checks themselves are the plan's (tests/test_plan.py); the placement carries what it says
    low = Plan.from_dict({"algorithm": "algorithm2-low-affinity", "prefill": [{}], "decode": [{}]})
    assert Placement.from_plan(low).same_node
    pinned = Plan.from_dict({"prefill": [{"node": "a"}, {}], "decode": [{}, {"node": "b"}]})
    assert Placement.from_plan(pinned) == Placement(("a", None), (None, "b"), False)
    with pytest.raises(ValueError, match="pairs prefill i with decode i"):
        Plan.from_dict({"same_node": True, "prefill": [{}, {}], "decode": [{}]})
    with pytest.raises(ValueError, match="pinned to a and decode"):
        Plan.from_dict({"same_node": True, "prefill": [{"node": "a"}], "decode": [{"node": "b"}]})
    with pytest.raises(ValueError, match="node id or IP"):
        Plan.from_dict({"prefill": [{"node": 3}], "decode": [{}]})
