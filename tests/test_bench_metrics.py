"""Metric arithmetic on hand-made traces, arrivals' statistics, SLO presets, argument parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distllm_jax.workload.arrivals import arrival_times
from bench.metrics import RequestRecord, attainment, summarize, tightest_scale
from distllm_jax.workload.goodput import goodput
from bench.runs import parse_pairs
from distllm_jax.workload.slo import PRESETS, SLO, resolve


def rec(i, arrival, first, finish, n, error=None):
    r = RequestRecord(i, arrival, 10, n, sent=arrival, first_token=first, finish=finish, output_tokens=n, error=error)
    return r


def test_ttft_tpot_and_attainment_by_hand():
    rs = [
        rec(0, 0.0, 0.2, 1.1, 10),  # ttft 0.2, tpot 0.1
        rec(1, 1.0, 1.5, 1.5, 1),  # ttft 0.5, single token: tpot 0
        rec(2, 2.0, 2.1, 4.1, 11),  # ttft 0.1, tpot 0.2
        rec(3, 3.0, math.nan, math.nan, 0, error="UNAVAILABLE"),
    ]
    assert rs[0].ttft == pytest.approx(0.2) and rs[0].tpot == pytest.approx(0.1)
    assert rs[1].tpot == 0.0 and rs[3].ttft == math.inf
    slo = SLO(0.25, 0.15)
    assert attainment(rs, slo) == 0.25  # only request 0 meets both
    assert attainment(rs, slo, scale=2.0) == 0.75  # (0.5 s, 0.3 s): requests 0, 1 and 2; the failed one never
    s = summarize(rs, slo)
    assert s["completed"] == 3 and s["errors"] == 1
    assert s["mean_ttft"] == pytest.approx((0.2 + 0.5 + 0.1) / 3)
    assert s["p50_tpot"] == pytest.approx(0.1)
    assert s["duration_s"] == pytest.approx(4.1)
    assert s["output_throughput"] == pytest.approx(22 / 4.1)


def test_scaled_attainment_counts_every_condition():
    rs = [rec(0, 0, 0.2, 1.1, 10), rec(1, 0, 0.5, 0.5, 1), rec(2, 0, 0.1, 2.1, 11)]
    assert attainment(rs, SLO(0.25, 0.15), 2.0) == 1.0
    assert attainment(rs, SLO(0.25, 0.15), 1.0) == pytest.approx(1 / 3)


def test_tightest_scale():
    rs = [rec(i, 0, 0.1 * (i + 1), 0.1 * (i + 1), 1) for i in range(10)]  # ttft 0.1 .. 1.0
    s = tightest_scale(rs, SLO(1.0, 1.0), target=0.9)
    assert s == pytest.approx(0.9, rel=1e-3)  # 9 of 10 need ttft <= 0.9
    assert tightest_scale([rec(0, 0, math.nan, math.nan, 0, error="x")], SLO(1, 1)) == math.inf


def test_goodput_bisection_finds_the_knee():
    knee = 3.7
    tried = []
    best, log = goodput(lambda r: tried.append(r) or (1.0 if r <= knee else 0.5), 0.5, 16, tol=0.01)
    assert knee * 0.99 <= best <= knee
    assert [r for r, _ in log] == tried
    assert goodput(lambda r: 0.0, 1, 8)[0] == 0.0
    assert goodput(lambda r: 1.0, 1, 8)[0] == 8


@pytest.mark.parametrize("rate,burst", [(2.0, 1.0), (10.0, 1.0), (5.0, 0.25), (5.0, 4.0)])
def test_arrivals_have_the_requested_rate(rate, burst):
    n = 20000
    t = arrival_times(n, rate, burst, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert (n - 1) / t[-1] == pytest.approx(rate, rel=0.05)
    cv = gaps.std() / gaps.mean()  # gamma: cv = 1/sqrt(shape)
    assert cv == pytest.approx(1 / math.sqrt(burst), rel=0.08)
    assert (arrival_times(10, rate, burst, seed=1) == arrival_times(10, rate, burst, seed=1)).all()


def test_slo_presets_and_parsing():
    assert PRESETS["opt-13b-sharegpt"] == SLO(0.25, 0.1)
    assert PRESETS["opt-66b-longbench"] == SLO(15.0, 0.15)
    assert resolve("0.3,0.05") == SLO(0.3, 0.05)
    with pytest.raises(ValueError):
        resolve("fast")
    assert parse_pairs("[(50, 2), (100, 4.5)]") == [(50, 2.0), (100, 4.5)]
    with pytest.raises(ValueError):
        parse_pairs("[(0, 2)]")


def test_record_roundtrip():
    r = rec(0, 0.0, 0.2, 1.1, 10)
    r.server = {"ttft": 0.1}
    back = RequestRecord.from_dict(r.to_dict())
    assert back.ttft == r.ttft and back.server == r.server
    bad = rec(1, 0, math.nan, math.nan, 0, error="x")
    assert RequestRecord.from_dict(bad.to_dict()).ttft == math.inf
