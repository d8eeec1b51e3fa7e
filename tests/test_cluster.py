"""Cluster mode on a local Ray cluster: 2 prefill actors (tp2; tp1 x pp2) and 1 decode actor (tp2),
each its own process with 2 virtual CPU devices. The mixed greedy batch equals the single-process
engine's output bit for bit, every migrated page is compared with the one left in prefill
(``check_transfers``), and killing an actor mid-run loses nothing that can be redone: prefill work is
re-queued from the prompt, requests decoding in a lost decode actor fail with the reason, the actor
is replaced while the others serve, and no page leaks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from distllm_jax.cluster import ClusterConfig, ClusterEngine
from distllm_jax.cluster.kv_paths import RemoteKVPuller
from distllm_jax.engine import Engine, FinishReason, InstanceSpec, SamplingParams
from distllm_jax.engine.programs import Segment
from distllm_jax.engine.transfer import host_pages
from distllm_jax.kv_cache import pages_for
from cluster_fixtures import local_ray
from engine_workload import MAX_LEN, greedy, run_arrivals, small_config, workload

VARIANT = "llama-gqa-llama3"
WORK = workload(32)
LAYOUT = dict(prefill=(InstanceSpec(2), InstanceSpec(1, pp=2)), decode=(InstanceSpec(2, num_pages=40),))


@pytest.fixture(scope="module")
def ckpt(converted):
    return converted(VARIANT)[1]


@pytest.fixture(scope="module")
def expected(ckpt):
    """The single-process engine's outputs for the same layout (6 of this process's 8 devices)."""
    with Engine(ckpt, small_config(**LAYOUT)) as engine:
        return [o.token_ids for o in run_arrivals(engine, WORK, lambda i, n: greedy(n))]


@pytest.fixture(scope="module")
def engine(ckpt):
    with local_ray():
        eng = ClusterEngine(ckpt, small_config(**LAYOUT), ClusterConfig(address="auto"))
        yield eng
        eng.shutdown(drain=False)


@pytest.fixture
def idle(engine):
    yield engine
    assert engine.wait_idle(60), engine.stats()
    assert engine.wait_replacements(120)
    engine.assert_no_leaks()


def settle(engine: ClusterEngine, timeout: float = 120) -> None:
    assert engine.wait_idle(timeout) and engine.wait_replacements(timeout), engine.stats()


def test_layout(engine):
    info = engine.cluster_info()
    actors = info["actors"]
    assert [a["name"] for a in actors] == ["prefill0", "prefill1", "decode0"]
    assert len({a["pid"] for a in actors}) == 3 and all(a["alive"] for a in actors)
    assert all(len(a["devices"]) == 2 and a["platform"] == "cpu" for a in actors)
    assert info["kv_path"] == "transfer-server" and info["nodes"] == 1


def test_mixed_batch_equals_single_process_engine(idle, expected):
    before = idle.stats()["migrations"]
    outs = run_arrivals(idle, WORK, lambda i, n: greedy(n))
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert out.error is None and out.finished is FinishReason.LENGTH, (i, out.error)
        assert out.token_ids == exp, f"request {i} diverged"
        if len(exp) > 1:  # migrated (and checked page by page on the way: check_transfers)
            assert out.timings.migration_path == "transfer-server" and out.timings.migration > 0
    stats = idle.stats()
    assert stats["migrations"] - before == sum(1 for _, n in WORK if n > 1)
    assert stats["migration_path"] == "transfer-server"
    assert {o.timings.prefill_instance for o in outs} == {"prefill0", "prefill1"}


@pytest.mark.parametrize("path", ["transfer-server", "staged"])
def test_kv_arrives_as_left_in_prefill(idle, path):
    """A sampled request's pages: prefilled in one actor, pulled into the decode actor by each path,
    read back from both processes and compared bit for bit."""
    src = idle.instances[1]  # tp1 x pp2 -> tp2: the pull reshards and joins the stages
    dst = next(i for i in idle.instances if i.role == "decode")
    prompt = WORK[5][0]
    rid = f"kv-sample-{path}"
    with idle.ctrl.cv:
        sp = src.alloc.ensure(rid, len(prompt))
        dp = dst.alloc.ensure(rid, len(prompt))
    try:
        src.run("prefill", [[Segment(prompt, 0, sp, SamplingParams(), 0)]])
        RemoteKVPuller(path, pages_for(MAX_LEN, src.page_size)).pull(src, sp, dst, dp)
        left, arrived = host_pages(src, sp), host_pages(dst, dp)
        assert left[0].shape[:2] == (src.info["stage_ranges"][-1][1], len(sp))
        assert np.abs(left[0]).sum() > 0  # real KV, not an empty page
        for a, b in zip(left, arrived):
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    finally:
        with idle.ctrl.cv:
            src.alloc.free(rid)
            dst.alloc.free(rid)


def _wait(cond, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_killed_prefill_actor_requeues_its_requests(idle, expected):
    victim = idle.instances[0]
    old_pid = victim.info["pid"]
    requeued = idle.stats()["requeued"]
    streams = [idle.submit(p, greedy(n)) for p, n in WORK]  # a burst: the decode pool holds a few at a time
    _wait(lambda: victim.alloc.num_used > 0 and idle.ctrl.held)  # requests prefilled and held in prefill0
    ray.kill(victim.actor)
    outs = [s.result() for s in streams]
    for i, (out, exp) in enumerate(zip(outs, expected)):  # nothing lost: redone from the prompt
        assert out.error is None and out.finished is FinishReason.LENGTH, (i, out.error)
        assert out.token_ids == exp, f"request {i} diverged"
    stats = idle.stats()
    assert stats["requeued"] > requeued
    assert any("prefill0 was lost" in e for e in stats["recent_errors"])
    settle(idle)
    idle.assert_no_leaks()
    new = idle.instances[0]
    assert new.name == "prefill0" and new.info["pid"] != old_pid and idle.cluster_info()["replacements"] >= 1
    again = run_arrivals(idle, WORK[:8], lambda i, n: greedy(n))  # the replacement serves
    assert [o.token_ids for o in again] == expected[:8]


def test_killed_decode_actor_fails_only_its_decoding_requests(idle, expected):
    victim = next(i for i in idle.instances if i.role == "decode")
    streams = [idle.submit(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p, _ in WORK[:12]]
    _wait(lambda: any(len(w.running) >= 2 for w in idle.workers if w.inst is victim))
    ray.kill(victim.actor)
    outs = [s.result() for s in streams]
    failed = [o for o in outs if o.finished is FinishReason.ERROR]
    assert failed, "some requests were decoding in the killed actor"
    for o in failed:
        assert "decode0 was lost" in o.error and o.num_output_tokens >= 1
    done = [(o, p) for o, (p, _) in zip(outs, WORK) if o.finished is FinishReason.LENGTH]
    assert len(done) + len(failed) == len(outs)
    assert all(len(o.token_ids) == min(30, MAX_LEN - len(p)) for o, p in done)
    settle(idle)
    idle.assert_no_leaks()
    again = run_arrivals(idle, WORK[:6], lambda i, n: greedy(n))
    assert [o.token_ids for o in again] == expected[:6]


def test_prefill_lost_between_choosing_and_pulling(idle, expected, monkeypatch):
    """Regression (seen once under bazel): a prefill actor lost after the decode worker chose to pull
    from it, but before the pull began, re-queued the request and emptied its holders; the pull then
    read ``holders[0]`` and the decode scheduler failed every request it was running. Now nothing is
    lost: that request is prefilled again, the others decode on."""
    from distllm_jax.engine.controller import InstanceLost
    from distllm_jax.engine.decode import DecodeWorker

    choose, fired = DecodeWorker._choose_pulls, []

    def choose_then_lose(self, now):
        pulls = choose(self, now)  # under the controller's lock, as the worker calls it
        if pulls and not fired and len(self.running) >= 2:
            src = pulls[0][1]
            fired.append(src.name)
            ray.kill(src.actor)
            self.ctrl.lose_instance(src, InstanceLost(src, "killed by the test"))
        return pulls

    monkeypatch.setattr(DecodeWorker, "_choose_pulls", choose_then_lose)
    streams = [idle.submit(p, greedy(n)) for p, n in WORK]
    done = idle.wait_idle(180)  # before the fix: a pull count stuck forever, the queue never drained
    monkeypatch.undo()
    assert done, idle.stats()
    outs = [s.result() for s in streams]
    assert fired, "no pull happened while two requests were decoding"
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert out.error is None and out.finished is FinishReason.LENGTH, (i, out.error)
        assert out.token_ids == exp, f"request {i} diverged"
    settle(idle)
