"""The simulator-vs-engine benchmark's own bookkeeping: step statistics shared by the engine's step log
and the simulator's recorded steps, per-request phases, logged steps against each run's fit, the host's
speed between two timings of the grid, and the table's verdict against the bar."""

from __future__ import annotations

import pytest

import argparse

from bench.sim_vs_engine import goodputs, phases, speed_ratio, step_ratios, step_stats, summary, workload_items
from distllm_jax.placement.latency import Fit, Profile
from distllm_jax.placement.simulator import SimConfig, SimRequest, Simulator
from distllm_jax.scheduling.plans import StepRecord


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
    steps = [StepRecord("p", "prefill", 0.0, 0.010, (8,), 8),
             StepRecord("d", "decode", 0.002, 0.008, (1, 1), 20),  # all of it beside the prefill
             StepRecord("d", "decode", 0.008, 0.014, (1,), 10),  # a third of it
             StepRecord("d", "decode", 0.020, 0.025, (1,), 11)]  # alone
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
    out = summary([row, dict(row, rate=4.0, engine_spread={"attainment_diff_points": [3.0, -7.5]})]).splitlines()
    assert out[0].endswith("eng-eng") and out[2].endswith("7.5") and out[-1].endswith("2 of 2 runs")


def test_step_ratios_pool_runs_each_against_its_own_fit():
    slow = Fit((20.0, 0, 0), (10.0, 0, 0), (10.0, 0, 0))  # the host ran at half speed around run 2
    run1 = [StepRecord("d", "decode", 0.0, 0.005, (1,), 5), StepRecord("d", "decode", 0.005, 0.011, (1,), 6)]
    run2 = [StepRecord("d", "decode", 0.0, 0.010, (1,), 5), StepRecord("d", "decode", 0.010, 0.022, (1,), 6)]
    out = step_ratios([(run1, toy_profile().fit(1)), (run2, slow)], SimConfig())
    assert out == {"decode": pytest.approx(1.1)}  # ratios 1.0, 1.2, 1.0, 1.2: no overlap split, one instance
    both = [StepRecord("p", "prefill", 0.0, 0.020, (8,), 8), StepRecord("d", "decode", 0.0, 0.010, (1,), 5),
            StepRecord("d", "decode", 0.030, 0.035, (1,), 6)]
    out = step_ratios([(both, toy_profile().fit(1))], SimConfig())
    assert out["prefill"] == pytest.approx(2.0) and out["prefill_overlapped_share"] == 1.0
    assert out["decode_alone"] == pytest.approx(1.0) and out["decode_overlapped"] == pytest.approx(2.0)


def test_speed_ratio_per_kind_over_the_grid():
    before = {("p", 16, 1): [10.0, 12.0], ("p", 32, 1): [20.0], ("d", 16, 1): [5.0], ("d", 48, 4): [8.0, 8.0, 9.0]}
    after = {("p", 16, 1): [11.0], ("p", 32, 1): [22.0], ("d", 16, 1): [5.0], ("d", 48, 4): [8.0]}
    assert speed_ratio(after, before) == {"prefill": pytest.approx(1.05), "decode": pytest.approx(1.0)}


def test_mixed_step_prediction_from_the_log_is_exact():
    """The log keeps rows' tokens and the whole context, not which rows were chunks; the model charges
    the context only through the sum of starts, so the prediction matches the true rows'."""
    from bench.sim_vs_engine import predicted_mixed_s

    fit = Fit((10.0, 0.1, 1e-4), (5.0, 0.01, 0.5), (5.0, 0.01, 0.5))
    cfg = SimConfig("chunked")
    decode_starts, chunks = [40, 17], [(0, 24), (8, 6)]  # two decode rows, a new prompt and a later chunk
    ctx = sum(s + 1 for s in decode_starts) + sum(s + n for s, n in chunks)
    logged = StepRecord("c", "mixed", 0.0, 0.1, (1, 1, 24, 6), ctx)
    assert predicted_mixed_s(cfg, fit, logged) == pytest.approx(cfg.mixed_s(fit, chunks, decode_starts, 1))


def test_a_declared_max_tokens_runs_each_request_to_it_or_to_the_context():
    args = argparse.Namespace(dataset=None, num_requests=20, min_prompt=8, max_prompt=60, min_output=4, max_output=9,
                              max_tokens=100, max_seq_len=64)
    items = workload_items(args, vocab=50)
    assert len(items) == 20 and all(o == min(100, 64 - len(p)) for p, o in items)
    assert all(3 <= t < 50 for p, _ in items for t in p)
    args.max_tokens = None
    assert all(4 <= o < 9 for _, o in workload_items(args, vocab=50))


def test_goodput_is_the_highest_rate_at_ninety_percent_per_mode_and_admission():
    runs = [{"mode": "colocated", "kv_admission": a, "rate": r, "engine_attainment": e, "sim_attainment": s}
            for a, r, e, s in [("reserve", 1, 0.95, 0.97), ("reserve", 2, 0.85, 0.91), ("on-demand", 1, 1.0, 1.0),
                               ("on-demand", 2, 0.92, 0.89), ("on-demand", 4, 0.5, 0.6)]]
    assert goodputs(runs) == {"colocated/reserve": {"engine": 1, "sim": 2},
                              "colocated/on-demand": {"engine": 2, "sim": 1}}


def test_profile_grid_leaves_out_decode_batches_the_pool_cannot_hold():
    """The engine never decodes a batch whose KV is over its pool, so the profile neither times one nor
    sizes its own pool for one (at 13B that pool would not fit beside the engine's)."""
    from distllm_jax.engine import RandomSource
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.presets import preset
    from distllm_jax.placement.profiler import Profiler

    src = RandomSource(ModelConfig.from_hf_dict(preset("tiny-opt")))
    prof = Profiler(src, 1, [16], [1], [1, 4, 8], [16, 64], page_size=16, max_decode_pages=20)
    # pages per row: 2 at context 16, 5 at 64; batch 8 at 64 takes 40 pages
    assert [p for p in prof.points if p[0] == "d"] == [("d", 16, 1), ("d", 16, 4), ("d", 16, 8), ("d", 64, 1),
                                                        ("d", 64, 4)]
    assert prof.inst.num_pages == 22
    with pytest.raises(ValueError, match="no decode point"):
        Profiler(src, 1, [16], [1], [8], [64], page_size=16, max_decode_pages=20)
