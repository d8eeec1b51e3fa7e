"""Latency-model fitting, the simulator on hand-checkable traces, and the placement search on cases
whose best plan is known; the plan file round-trips into the server's engine configuration."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from distllm_jax.placement.latency import Fit, Profile, fit_decode, fit_decode_split, fit_prefill, load_profile
from distllm_jax.placement.search import Cluster, algorithm1, algorithm2, colocated_search, workload_from
from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.simulator import SimConfig, SimRequest, Simulator

GB = 1e9


def const_profile(prefill_ms=10.0, decode_ms=5.0, fits=None, mem=80 * GB, kv_per_token=1e6, params=1 * GB,
                  layers=8) -> Profile:
    fits = fits or {1: Fit((prefill_ms, 0, 0), (decode_ms, 0, 0), (decode_ms, 0, 0))}
    return Profile("toy", "toy", fits, params_bytes=params, kv_bytes_per_token=kv_per_token,
                   gpu_memory_bytes=mem, num_layers=layers)


def run(profile, cfg, reqs):
    return Simulator(profile, cfg).run([SimRequest(*r) for r in reqs])


def test_fit_recovers_coefficients():
    rng = np.random.default_rng(0)
    true_p, true_d = (12.0, 0.1, 2e-5), (8.0, 3e-4, 0.05)
    pre = []
    for _ in range(30):
        ls = list(rng.integers(16, 1024, rng.integers(1, 6)))
        pre.append((ls, true_p[0] + true_p[1] * sum(ls) + true_p[2] * sum(x * x for x in ls)))
    dec = [(b, c, true_d[0] + true_d[1] * c + true_d[2] * b) for b in (1, 8, 32, 64) for c in (100, 5000, 40000)]
    (p, pe), (d, de) = fit_prefill(pre), fit_decode(dec)
    assert np.allclose(p, true_p, rtol=1e-6) and np.allclose(d, true_d, rtol=1e-6) and pe < 1e-9 and de < 1e-9


def test_decode_fit_in_two_pieces():
    """A per-row cost that falls with the batch (one line misfits it) is found in two pieces with
    the threshold where it changes; data on one line stays in one piece."""
    small, large = (10.0, 1e-3, 2.0), (16.0, 1e-3, 0.5)
    model = lambda b, c: (small if b < 8 else large)[0] + 1e-3 * c + (small if b < 8 else large)[2] * b  # noqa: E731
    dec = [(b, b * c, model(b, b * c)) for b in (1, 2, 4, 8, 16, 32) for c in (16, 64, 128)]
    fit, err = fit_decode_split(dec)
    assert fit.threshold == 8 and err < 1e-9
    assert np.allclose(fit.decode_small, small) and np.allclose(fit.decode_large, large)
    assert fit.decode_ms(4, 4 * 64) == pytest.approx(model(4, 4 * 64))
    assert fit_decode(dec)[1] > 0.02  # one line over all of it is off by percent
    line = [(b, b * c, 5.0 + 2e-3 * b * c + 0.3 * b) for b in (1, 2, 4, 8, 16) for c in (16, 64)]
    one, err = fit_decode_split(line)
    assert one.threshold == 10**9 and err < 1e-9 and np.allclose(one.decode_small, (5.0, 2e-3, 0.3))


def test_decode_fit_lends_the_context_term_to_a_piece_that_cannot_fix_it():
    """With the long contexts left out at large batches (the pool cannot hold them), the large
    batches sit at one context, so their own context term is unknowable (a least-squares line
    through them put a step of batch 32 at context 225 at 3.5x its time). That piece takes the
    small batches' term, the cost of reading a token's KV, and fits the rest."""
    small, large = (10.0, 1e-3, 2.0), (16.0, 1e-3, 0.5)
    model = lambda b, c: (small if b < 16 else large)[0] + 1e-3 * c + (small if b < 16 else large)[2] * b  # noqa: E731
    dec = [(b, b * c, model(b, b * c)) for b in (1, 4, 16, 32, 64) for c in (32, 128, 224) if b < 16 or c == 32]
    fit, err = fit_decode_split(dec)
    assert fit.threshold == 16 and err < 1e-9
    assert np.allclose(fit.decode_large, large) and np.allclose(fit.decode_small, small)
    assert fit.decode_ms(32, 32 * 225) == pytest.approx(model(32, 32 * 225))
    # two large batches at one context leave no point to spare: one line over all, not a guess
    assert fit_decode_split([x for x in dec if x[0] != 64])[0].threshold == 10**9



def test_shipped_profiles():
    p = load_profile("a100-opt-13b")
    assert sorted(p.fits) == [1, 2, 4] and p.fit(1).prefill == (18.1025, 0.101912, 7.122e-6)
    assert p.fits_memory(1, 1) and load_profile("a100-opt-66b").fits_memory(2, 1)
    assert not load_profile("a100-opt-66b").fits_memory(1, 1)  # 131 GB of weights on one 80 GB GPU
    assert "EXTRAPOLATED" in load_profile("a100-opt-175b").source
    with pytest.raises(FileNotFoundError):
        load_profile("no-such-profile")


@pytest.mark.parametrize("mode", ["colocated", "disaggregated", "chunked"])
def test_one_request_by_hand(mode):
    prof = const_profile()
    cfg = SimConfig(mode, transfer_gbps=0)
    (r,) = run(prof, cfg, [(0.0, 8, 4)])
    assert r.ttft == pytest.approx(0.010)  # one prefill
    assert r.finish == pytest.approx(0.010 + 3 * 0.005)  # three decode steps for tokens 2..4
    assert r.tpot == pytest.approx(0.005)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_host_overheads_by_hand(mode):
    """Admission and per-step bookkeeping add exactly to a lone request; contention needs a partner."""
    cfg = SimConfig(mode, transfer_gbps=0, admission_s=0.002, step_overhead_s=0.001, host_contention=2.0)
    (r,) = run(const_profile(), cfg, [(0.0, 8, 4)])
    assert r.ttft == pytest.approx(0.002 + 0.010 + 0.001)
    assert r.tpot == pytest.approx(0.005 + 0.001)


def test_host_contention_slows_overlapping_steps():
    """Disaggregated on one host, processor sharing at half speed each while two steps run: B's
    prefill (10 ms of work) starts at 0.0125 with A's first decode step half done. A's step ends at
    0.0175, its second runs to 0.0275, B's prefill ends at 0.0325 (TTFT 20 ms), A's third step
    finishes alone at 0.035 and its fourth at 0.040."""
    prof = const_profile()
    reqs = [(0.0, 8, 5), (0.0125, 8, 2)]
    free = run(prof, SimConfig("disaggregated", transfer_gbps=0), reqs)
    shared = run(prof, SimConfig("disaggregated", transfer_gbps=0, host_contention=2.0), reqs)
    assert free[1].ttft == pytest.approx(0.010)
    assert shared[1].ttft == pytest.approx(0.020)
    assert shared[0].ttft == pytest.approx(0.010)  # A's prefill ran alone
    assert shared[0].finish == pytest.approx(0.040) and free[0].finish == pytest.approx(0.030)
    assert SimConfig(host_contention=1.5).contended(1.0, 0.010, 1.005) == pytest.approx(0.0125)  # colocated
    assert SimConfig(host_contention=1.5).contended(1.0, 0.010, 0.999) == pytest.approx(0.010)


def test_migration_time_from_bandwidth():
    prof = const_profile(kv_per_token=1e6)  # 1 MB per token
    (r,) = run(prof, SimConfig("disaggregated", transfer_gbps=1.0), [(0.0, 100, 2)])  # 100 MB at 1 GB/s
    assert r.migration_end - r.migration_start == pytest.approx(0.1)
    assert r.finish == pytest.approx(0.010 + 0.1 + 0.005)


def test_pull_timeline_with_lookahead():
    """The engine's pull, step by step (prefill 10 ms, decode steps 5 ms, one prompt per prefill).
    A's pull is offered as its prefill ends, so its gather goes ahead of B's prefill: it lands at
    0.010 on the idle decode instance and decodes at once. B's is offered at 0.020 while A's third
    step runs with the fourth queued: the scatter lands after those (0.030), the steps dispatched at
    0.030 and 0.035 were fixed before it, so its second token comes with the step ending at 0.045.
    A pull chosen later by the decode side waits for the prefill step in flight: the batch (two) is
    full until A ends at 0.105, when C is pulled while E's prefill runs to 0.110."""
    prof = const_profile()
    cfg = SimConfig("disaggregated", transfer_gbps=0, max_prefill_seqs=1, decode_lookahead=True,
                    max_decode_batch=2)
    a, b, c, d, e = run(prof, cfg, [(0.0, 8, 20), (0.001, 8, 20), (0.002, 8, 4), (0.003, 8, 4), (0.1, 8, 2)])
    assert (a.first_token, a.migration_end, a.second_token) == pytest.approx((0.010, 0.010, 0.015))
    assert (b.first_token, b.migration_start, b.migration_end) == pytest.approx((0.020, 0.020, 0.030))
    assert b.second_token == pytest.approx(0.045)
    assert (c.first_token, d.first_token, e.first_token) == pytest.approx((0.030, 0.040, 0.110))
    assert a.finish == pytest.approx(0.105) and c.migration_start == pytest.approx(0.105)
    assert c.migration_end >= 0.110 - 1e-9 and d.migration_start >= c.migration_end


def test_fcfs_and_the_token_budget():
    prof = const_profile()
    cfg = SimConfig("colocated", prefill_token_budget=512)
    a, b, c = run(prof, cfg, [(0.0, 300, 2), (0.0, 300, 2), (0.0, 100, 2)])
    assert a.ttft == pytest.approx(0.010)  # alone: 300 + 300 exceeds the budget
    assert b.ttft == pytest.approx(0.010 + 0.010) and c.ttft == b.ttft  # b and c batch together (400 tokens)
    big = run(prof, cfg, [(0.0, 2000, 2)])[0]  # longer than the budget: runs alone
    assert big.ttft == pytest.approx(0.010)


def test_decode_memory_makes_requests_wait():
    # room for exactly one request's KV (prompt + output = 20 tokens) on the decode instance
    prof = const_profile(mem=1.0 * GB, params=0.1 * GB, kv_per_token=0.8e9 / 30)
    cap = prof.kv_token_capacity(1, 1)
    assert 20 <= cap < 40
    cfg = SimConfig("disaggregated", transfer_gbps=0)
    a, b = run(prof, cfg, [(0.0, 10, 10), (0.0, 10, 10)])
    assert b.migration_start >= a.finish  # b waits in prefill memory until a's pages are free
    assert b.finish == pytest.approx(b.migration_start + 9 * 0.005)  # then 9 steps for tokens 2..10
    assert b.tpot > 0.005  # TPOT counts from the first token, so the wait shows in it (as in the engine)


def test_pipeline_prefill_throughput_and_latency():
    prof = const_profile(fits={1: Fit((20.0, 0, 0), (5.0, 0, 0), (5.0, 0, 0))})
    cfg = SimConfig("disaggregated", prefill=(InstanceSpec(1, 2),), prefill_token_budget=8, transfer_gbps=0)
    rs = run(prof, cfg, [(0.0, 8, 2), (0.0, 8, 2)])
    # each batch holds the 2-stage pipeline for one stage (10 ms) and reaches its token after both
    assert [r.ttft for r in rs] == pytest.approx([0.020, 0.030])


def test_algorithm1_picks_the_best_per_gpu_degrees():
    # one prompt per prefill batch, one layer (no pipelining): prefill tp2 is 3x faster than tp1 (1.5x
    # per GPU), decode tp2 only 1.5x faster (0.75x per GPU): the search must split them that way
    fits = {1: Fit((60.0, 0, 0), (20.0, 0, 0), (20.0, 0, 0)), 2: Fit((20.0, 0, 0), (13.3, 0, 0), (13.3, 0, 0))}
    prof = const_profile(fits=fits, layers=1)
    wl = workload_from([(64, 8)] * 50, 300)
    plan = algorithm1(prof, wl, (0.2, 0.1), Cluster(1, 8), rate=20.0, max_decode_batch=4, prefill_token_budget=64)
    assert plan.detail["prefill"] == "tp2pp1" and plan.detail["decode"] == "tp1pp1"
    assert plan.expected_goodput >= 20.0 * 0.95 and all(p.tp == 2 for p in plan.prefill)


def test_algorithm2_and_colocated_search():
    fits = {1: Fit((60.0, 0, 0), (20.0, 0, 0), (20.0, 0, 0)), 2: Fit((20.0, 0, 0), (13.3, 0, 0), (13.3, 0, 0))}
    prof = const_profile(fits=fits)
    wl = workload_from([(64, 8)] * 50, 200)
    plan = algorithm2(prof, wl, (0.2, 0.1), Cluster(1, 4), rate=5.0, max_decode_batch=4)
    assert plan.detail["unit"] in {f"P-tp{a}/D-tp{b}/pp1" for a in (1, 2) for b in (1, 2)}
    assert all(p.tp + d.tp <= 4 for p, d in zip(plan.prefill, plan.decode))  # one node holds each pair
    co = colocated_search(prof, wl, (0.2, 0.1), Cluster(1, 4), rate=5.0, max_decode_batch=4)
    assert co.mode == "colocated" and co.expected_goodput >= 5.0 * 0.95


def test_plan_file_feeds_the_server(tmp_path):
    from serve.cli import engine_config

    fits = {1: Fit((60.0, 0, 0), (20.0, 0, 0), (20.0, 0, 0)), 2: Fit((20.0, 0, 0), (13.3, 0, 0), (13.3, 0, 0))}
    plan = algorithm1(const_profile(fits=fits), workload_from([(64, 8)] * 50, 200), (0.2, 0.1), Cluster(1, 8),
                      rate=10.0, max_decode_batch=4)
    path = tmp_path / "plan.json"
    plan.save(path)
    ns = argparse.Namespace(plan=str(path), page_size=16, num_pages=64, max_seq_len=None, prefill_token_budget=512,
                            max_decode_batch=32, kv_transfer="local", dtype=None, quiet=True,
                            kv_admission="on-demand", preemption="recompute", kv_watermark=0.01,
                            prefix_cache=False, prefill_routing="auto", compile_threads=0)
    ecfg = engine_config(ns, 8)
    assert ecfg.mode == "disaggregated"
    assert [(s.tp, s.pp) for s in ecfg.prefill] == [(p.tp, p.pp) for p in plan.prefill]
    assert [(s.tp, s.pp) for s in ecfg.decode] == [(p.tp, p.pp) for p in plan.decode]


def test_cli_simulate_place_profile(tmp_path, capsys, converted):
    from distllm_jax.cli import main

    cache = ["--num-prompts", "200"]
    assert main(["simulate", "--mode", "colocated", "--colocated", "1xtp2p1", "--rates", "1,4", *cache]) == 0
    out = capsys.readouterr().out
    assert "colocated on 2 GPUs" in out and out.count("%") == 2
    plan = tmp_path / "plan.json"
    # one node of 4 GPUs (the default is 8): half the layouts to search, and the same plan
    assert main(["place", "--algorithm", "low", "--rate", "2", "--gpus-per-node", "4", "--out", str(plan), *cache]) == 0
    d = json.loads(plan.read_text())
    assert d["mode"] == "disaggregated" and d["prefill"] and d["decode"] and d["expected_goodput"] >= 2
    _, ckpt = converted("opt-pre-ln")
    prof = tmp_path / "cpu.json"
    assert main(["profile", "--checkpoint", str(ckpt), "--tp", "1,2", "--prompt-lens", "16,32",
                 "--prompts-per-batch", "1,2", "--batches", "1,4", "--contexts", "16,48", "--repeats", "1",
                 "--max-seq-len", "96", "--out", str(prof)]) == 0
    p = load_profile(str(prof))
    assert sorted(p.fits) == [1, 2] and p.num_layers == 2
    assert "mean |err|" in capsys.readouterr().out
    # said before anything compiles
    assert main(["profile", "--checkpoint", str(ckpt), "--contexts", "16,48", "--max-seq-len", "40", "--out", str(prof)]) != 0
    assert "max_seq_len 40 is shorter than the grid's longest sequence (257 tokens)" in capsys.readouterr().err
