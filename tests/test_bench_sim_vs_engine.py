"""The simulator-vs-engine benchmark's own bookkeeping: step statistics shared by the engine's step log
and the simulator's recorded steps, per-request phases, and the table's verdict against the bar."""

from __future__ import annotations

import pytest

from bench.sim_vs_engine import phases, step_stats, summary
from distllm_jax.placement.latency import Fit, Profile
from distllm_jax.placement.simulator import SimConfig, SimRequest, SimStep, Simulator


def toy_profile() -> Profile:
    return Profile("toy", "toy", {1: Fit((10.0, 0, 0), (5.0, 0, 0), (5.0, 0, 0))}, params_bytes=1e9,
                   kv_bytes_per_token=1e6, gpu_memory_bytes=80e9, num_layers=8)


def test_recorded_steps_and_phases_of_a_pulled_request():
    sim = Simulator(toy_profile(), SimConfig("disaggregated", transfer_gbps=0), record=True)
    (r,) = sim.run([SimRequest(0.0, 8, 4)])
    assert [(s.kind, len(s.lengths)) for s in sim.steps] == [("prefill", 1)] + [("decode", 1)] * 3
    assert sim.steps[1].start == pytest.approx(0.010) and sim.steps[-1].end == pytest.approx(r.finish)
    ph = phases(r, r.output_len)
    assert ph["prefill"] == pytest.approx(0.010) and ph["held"] == pytest.approx(0.0)
    assert ph["join"] == pytest.approx(0.005) and ph["step"] == pytest.approx(0.005)


def test_step_stats_count_steps_beside_another_instance():
    steps = [SimStep("p", "prefill", 0.0, 0.010, (8,), 8),
             SimStep("d", "decode", 0.002, 0.008, (1, 1), 20),  # all of it beside the prefill
             SimStep("d", "decode", 0.008, 0.014, (1,), 10),  # a third of it
             SimStep("d", "decode", 0.020, 0.025, (1,), 11)]  # alone
    st = step_stats(steps)
    assert st["decode"]["steps"] == 3 and st["decode"]["overlapped_share"] == pytest.approx(1 / 3)
    assert st["decode"]["mean_rows"] == pytest.approx(4 / 3) and st["prefill"]["overlapped_share"] == 1.0


def test_summary_marks_runs_outside_the_bar():
    row = dict(mode="colocated", rate=2.0, engine_p50_ttft=0.1, sim_p50_ttft=0.105, ttft_rel_diff=0.05,
               engine_p50_tpot=0.02, sim_p50_tpot=0.02, tpot_rel_diff=0.0, engine_attainment=1.0,
               sim_attainment=0.97, attainment_diff_points=-3.0)
    assert summary([row]).endswith("1 of 1 runs")
    out = summary([row, dict(row, rate=4.0, tpot_rel_diff=-0.12)])
    assert "1 of 2 runs" in out and out.splitlines()[2].endswith("*")
