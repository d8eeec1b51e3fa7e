"""bench/sim_vs_real.py on small synthetic traces: run names to systems and layouts, the per-run
table, the RMSE over runs and per system, the JSON, and ``distllm bench sim-vs-real``."""

from __future__ import annotations

import json
import math

import pytest

from bench.sim_vs_real import compare_dir, parse_run
from distllm_jax.cli import main
from distllm_jax.instance_spec import InstanceSpec


def _trace(path, n: int, gap: float, ttft: float, tpot: float) -> None:
    rows = [{"arrival_s": i * gap, "prompt_len": 64 + 8 * i, "output_len": 8, "ttft_s": ttft, "tpot_s": tpot}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_run_names():
    v = parse_run("vllm-300-3")
    assert (v.system, v.profile, v.requests, v.rate) == ("vllm", "a100-opt-13b-vllm", 300, 3.0)
    assert v.cfg.mode == "colocated" and v.cfg.colocated == (InstanceSpec(1, 1),) and v.layout == "tp1pp1"
    d = parse_run("distserve-c21d12-300-10.5")
    assert (d.system, d.profile, d.rate) == ("distserve", "a100-opt-13b", 10.5)
    assert d.cfg.prefill == (InstanceSpec(2, 1),) and d.cfg.decode == (InstanceSpec(1, 2),)
    assert d.cfg.mode == "disaggregated"
    assert parse_run("vllm-10-1", vllm_system="vllm-defaults").cfg.prefill_token_budget == 2048
    with pytest.raises(ValueError, match="vllm-N-R or distserve-cPQdRS-N-R"):
        parse_run("sglang-10-1")


def test_compare_dir_and_rmse(tmp_path):
    # light load on A100 profiles: every simulated request attains (0.2 s, 0.1 s)
    _trace(tmp_path / "vllm-4-1.jsonl", 4, 1.0, 0.5, 0.05)  # measured: all miss TTFT -> 0 %
    _trace(tmp_path / "vllm-4-2.jsonl", 4, 0.5, 0.05, 0.05)  # measured: all attain -> 100 %
    _trace(tmp_path / "distserve-c21d11-5-1.jsonl", 5, 1.0, 0.05, 0.5)  # all miss TPOT -> 0 %
    (tmp_path / "README.md").write_text("not a trace")
    res = compare_dir(tmp_path, (0.2, 0.1))
    assert [r["run"] for r in res["runs"]] == ["distserve-c21d11-5-1", "vllm-4-1", "vllm-4-2"]
    assert [r["sim"]["attainment_pct"] for r in res["runs"]] == [100.0, 100.0, 100.0]
    assert [r["attainment_diff"] for r in res["runs"]] == [100.0, 100.0, 0.0]
    assert res["rmse_attainment"] == pytest.approx(math.sqrt(20000 / 3))
    assert res["rmse_attainment_by_system"] == {"distserve": 100.0, "vllm": pytest.approx(math.sqrt(5000))}
    r = res["runs"][1]
    assert r["ttft_p50_rel"] == pytest.approx(r["sim"]["ttft_p50_s"] / 0.5 - 1)
    assert res["systems"]["vllm"]["profile"] == "a100-opt-13b-vllm"
    assert res["systems"]["distserve"]["config"]["prefill_token_budget"] == 8192


def test_cli_writes_json_and_table(tmp_path, capsys):
    _trace(tmp_path / "vllm-3-1.jsonl", 3, 1.0, 0.05, 0.05)
    out = tmp_path / "res" / "svr.json"
    assert main(["bench", "sim-vs-real", "--traces", str(tmp_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "vllm-3-1" in text and "RMSE of attainment: 0.0 points over 1 runs (vllm 0.0)" in text
    res = json.loads(out.read_text())
    assert res["slo"] == [0.2, 0.1] and res["runs"][0]["real"]["attainment_pct"] == 100.0
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "vllm-1-1.jsonl").write_text('{"arrival_s": 0, "prompt_len": 4, "output_len": 4}\n')
    assert main(["bench", "sim-vs-real", "--traces", str(bare), "--out", ""]) == 2
    assert "no measured" in capsys.readouterr().err
    assert main(["bench", "sim-vs-real", "--traces", str(tmp_path / "res"), "--out", ""]) == 2
    assert "no traces" in capsys.readouterr().err
