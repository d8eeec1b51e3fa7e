"""`distllm bench multi-gpu` (bench/multi_gpu.py) end to end on virtual CPU devices, reduced: probe,
profile, plan, disaggregated + colocated sweeps through real servers, breakdown, simulator check; and
the arithmetic it relies on (goodput read off measured points, latency shares, node filling)."""

from __future__ import annotations

import json
import math

import pytest

from bench import breakdown as bd
from bench.multi_gpu import profile_grid, fill_disaggregated


def test_interpolated_goodput_and_ratio():
    g = bd.interpolated_goodput([1, 2, 4], [1.0, 0.95, 0.5])
    assert g["bound"] == "exact" and g["between"] == [2, 4]
    assert g["goodput"] == pytest.approx(2 + 2 * (0.95 - 0.9) / 0.45)
    assert bd.interpolated_goodput([1, 2], [0.95, 0.91]) == {"goodput": 2.0, "bound": "lower"}
    assert bd.interpolated_goodput([2, 1], [0.5, 0.8])["goodput"] == 0.0  # unsorted input; none meets it
    # the first failure ends the curve even if a later (noisy) point passes again
    assert bd.interpolated_goodput([1, 2, 4], [0.9, 0.8, 0.95])["goodput"] == pytest.approx(1.0)
    r = bd.goodput_ratio({"goodput": 3.0, "bound": "exact"}, {"goodput": 1.5, "bound": "exact"})
    assert r == {"ratio": 2.0, "note": "exact"}
    assert bd.goodput_ratio({"goodput": 3.0, "bound": "exact"}, {"goodput": 0.0, "bound": "upper"})["ratio"] is None


def test_breakdown_shares_and_migration_bandwidth():
    servers = [{"ttft": 0.3, "queueing": 0.1, "migration": 0.05, "e2e": 1.35},
               {"ttft": 0.2, "queueing": 0.0, "migration": 0.0, "e2e": 0.2}]
    assert bd.request_parts(servers[0]) == pytest.approx(
        {"queueing": 0.1, "prefill": 0.2, "migration": 0.05, "decode": 1.0})
    s = bd.summarize_breakdown(servers)
    assert s["requests"] == 2 and s["share_sum_max_abs_err"] < 1e-12
    assert s["share_of_total"]["decode"] == pytest.approx(1.0 / 1.55)
    assert sum(s["mean_share"].values()) == pytest.approx(1.0)
    bpt = bd.kv_bytes_per_token(40, 40, 128, 2)  # OPT-13B in bf16: 800 KiB per token
    assert bpt == 819200
    m = bd.migration_stats([{"prompt_len": 1000, "server": servers[0]}, {"prompt_len": 5, "server": servers[1]}], bpt)
    assert m["migrated"] == 1 and m["bandwidth_gbps"]["p50"] == pytest.approx(1000 * bpt / 0.05 / 1e9)
    assert m["cdf"][-1] == (0.05, 1.0)


def test_fill_disaggregated_fills_the_node():
    per = {"tp1pp1": {"prefill_goodput": 2.0, "decode_goodput": 1.0},
           "tp2pp1": {"prefill_goodput": 5.0, "decode_goodput": 4.0}}
    f = fill_disaggregated(per, 8)
    # the best of every count and degree combination that fits 8 devices (brute force)
    assert f["gpus"] <= 8 and f["goodput"] == pytest.approx(max(
        min(n * gp, m * gd) for (gp, cp) in ((2, 1), (5, 2)) for (gd, cd) in ((1, 1), (4, 2))
        for n in range(1, 9) for m in range(1, 9) if n * cp + m * cd <= 8))
    assert fill_disaggregated({"tp1pp1": {"prefill_goodput": 0.0, "decode_goodput": 1.0}}, 4) is None


def test_profile_grid_replaces_the_axes_it_names():
    g = profile_grid("cpu", "prompt_lens=16,32; prompts=1;repeats=1")
    assert g == {**profile_grid("cpu"), "prompt_lens": [16, 32], "prompts_per_batch": [1], "repeats": 1}
    with pytest.raises(ValueError, match="the keys are"):
        profile_grid("cpu", "prompt_len=16")


def test_multi_gpu_end_to_end(tmp_path, capsys):
    from distllm_jax.cli import main

    out = tmp_path / "out"
    n = 6  # requests per rate
    # the profile's grid near the servers' limits (64 tokens, 2 rows): fewer programs to compile
    grid = "prompt_lens=16,32,64;prompts=1,2;batches=1,2,4;contexts=16,48"
    rc = main(["bench", "multi-gpu", "--part", "all", "--model", "tiny-opt", "--devices", "4", "--profile-now",
               "--profile-tps", "1", "--profile-grid", grid, "--modes", "disaggregated,colocated", "--rates", "2,4",
               "--num-prompts", str(n), "--slo", "1.0,0.05", "--max-seq-len", "64", "--max-decode-batch", "2",
               "--prefill-token-budget", "64", "--num-pages", "160", "--copy-mib", "16", "--quiet", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "==== summary ====" in text
    files = sorted(p.name for p in out.iterdir())
    assert files == ["attainment-cpux4-tiny-opt.png", "breakdown-cpux4-tiny-opt.png", "multi-gpu-cpux4-tiny-opt.json",
                     "plan-cpux4-tiny-opt.json", "profile-cpux4-tiny-opt.json"]
    d = json.loads((out / "multi-gpu-cpux4-tiny-opt.json").read_text())
    assert d["probes"][0]["copy"]["gbps"] > 0
    prof = json.loads((out / "profile-cpux4-tiny-opt.json").read_text())
    assert prof["grid"]["prompt_lens"] == [16, 32, 64] and prof["grid"]["batches"] == [1, 2, 4]

    # the plan: written as `distllm serve --plan` reads it, and the server built exactly that layout
    plan = json.loads((out / "plan-cpux4-tiny-opt.json").read_text())
    assert plan["mode"] == "disaggregated" and plan["prefill"] and plan["decode"] and plan["gpus"] <= 4
    for mode in ("disaggregated", "colocated"):
        e = d["sweep"][mode]
        assert e["server_exit"] == 0 and e["engine"]["mode"] == mode
        roles = [(i["role"], i["tp"], i["pp"]) for i in e["engine"]["instances"]]
        want = ([("prefill", p["tp"], p["pp"]) for p in plan["prefill"]] + [("decode", p["tp"], p["pp"]) for p in plan["decode"]]
                if mode == "disaggregated" else [("colocated", p["tp"], 1) for p in e["plan"]["colocated"]])
        assert roles == want
        assert e["gpus"] == sum(tp * pp for _, tp, pp in roles) <= 4
        assert [r["per_gpu_rate"] for r in e["runs"]] == [2.0, 4.0]
        for r in e["runs"]:
            assert r["rate"] == pytest.approx(r["per_gpu_rate"] * e["gpus"])
            assert 0.0 <= r["summary"]["attainment"] <= 1.0
            assert r["summary"]["errors"] == 0 and len(r["requests"]) == n
        g = e["goodput_per_gpu"]
        assert g["bound"] in ("exact", "lower", "upper") and 0 <= g["goodput"] <= 4
    assert d["plan"]["plans"]["colocated"]["gpus"] == 4  # replicated to fill the node

    ratio = d["goodput_ratio"]["colocated"]
    if ratio["ratio"] is not None:
        assert math.isfinite(ratio["ratio"]) and ratio["ratio"] >= 0

    # breakdown: shares sum to 1 per request; every disaggregated request migrated, in positive time
    for row in d["breakdown"]["per_rate"]:
        b = row["breakdown"]
        assert b["requests"] == n and b["share_sum_max_abs_err"] < 1e-9
        assert sum(b["share_of_total"].values()) == pytest.approx(1.0)
        assert row["migration"]["migrated"] == n and row["migration"]["time_s"]["p50"] > 0
        assert row["migration"]["bandwidth_gbps"]["p50"] > 0
    for r in d["sweep"]["disaggregated"]["runs"][0]["requests"]:
        assert r["server"]["migration"] > 0 and r["server"]["decode_instance"].startswith("decode")
    for r in d["sweep"]["colocated"]["runs"][0]["requests"]:
        assert r["server"]["migration"] == 0

    # simulator check: one row per measured rate, attainments in [0, 1]
    for mode in ("disaggregated", "colocated"):
        rows = d["simcheck"][mode]["rows"]
        assert [r["per_gpu_rate"] for r in rows] == [2.0, 4.0]
        assert all(0 <= r["sim_attainment"] <= 1 and 0 <= r["measured_attainment"] <= 1 for r in rows)
