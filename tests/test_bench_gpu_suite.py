"""`bench/gpu_suite.py` on the CPU with a tiny model: every part runs, and its numbers are sane.

The suite is meant for the GPU machine, where a crash costs device time; this runs the same code paths
(the decode grid with a skipped shape, prefill MFU, the trace summary, the engine end to end) first.
"""

from __future__ import annotations

import json

import pytest

from bench import gpu_suite


def test_every_part_runs_on_tiny_models(tmp_path, capsys):
    out = tmp_path / "suite"
    rc = gpu_suite.main(["--parts", "ceilings,decode,prefill,trace,profile,e2e", "--models", "tiny-opt",
                         "--profile-grid", "prompt_lens=16,32;prompts=1,2;batches=1,2;contexts=16,48",
                         "--batches", "1,4", "--contexts", "32,600", "--prefill-tokens", "64,256",
                         "--trace", "2:32", "--e2e", "3:16:6", "--e2e-budget", "64", "--repeats", "2",
                         "--out", str(out), "--trace-dir", str(tmp_path / "traces")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "FAILED" not in text and "==== summary ====" in text
    ceil = json.loads((out / "ceilings-cpu.json").read_text())
    assert ceil["copy_tb_per_s"] > 0 and ceil["matmul_tflop_per_s"] > 0
    # both stream the same memory: the read-only rate is within a small factor of the copy rate
    # (a unit slip once made it a thousandth of it)
    assert 0.01 < ceil["read_tb_per_s"] / ceil["copy_tb_per_s"] < 100  # loaded CPUs time both roughly
    decode = json.loads((out / "gpu-suite-decode-cpu-tiny-opt.json").read_text())["rows"]
    # tiny-opt has 512 positions: a context of 600 is measured at the last position, 511
    assert sorted({r["context"] for r in decode}) == [32, 511]
    for r in decode:
        assert 0 < r["device_ms"] and 0 < r["engine_ms"] and 0 <= r["host_share"] < 1
        # the floor: what the step reads over the read-only rate; the copy rate's floor beside it
        assert r["floor_ms"] == pytest.approx(r["floor_bytes"] / ceil["read_tb_per_s"] / 1e9)
        assert r["copy_floor_ms"] == pytest.approx(r["floor_bytes"] / ceil["copy_tb_per_s"] / 1e9)
        assert r["x_floor"] == pytest.approx(r["engine_ms"] / r["floor_ms"])
    prefill = json.loads((out / "gpu-suite-prefill-cpu-tiny-opt.json").read_text())["rows"]
    assert [r["tokens"] for r in prefill] == [64, 256] and all(r["tflop"] > 0 and r["mfu"] > 0 for r in prefill)
    (trace,) = json.loads((out / "gpu-suite-trace-cpu-tiny-opt.json").read_text())["rows"]
    assert trace["hlo"]["conditionals"] == 0  # sampling is its own program, not a branch in the step
    assert trace["host_top"] and trace["wall_us_per_step"] > 0
    assert sum(trace["us_per_step_by_kind"].values()) == pytest.approx(trace["busy_us_per_step"])
    (prof,) = json.loads((out / "gpu-suite-profile-cpu-tiny-opt.json").read_text())["rows"]
    fitted = json.loads((out / "profile-cpu-tiny-opt.json").read_text())
    assert fitted["model"] == "tiny-opt" and "1" in fitted["fits"] and prof["decode_mean_rel_err"] >= 0
    for r in decode:
        assert r["sync_ms"] > 0
    (e2e,) = json.loads((out / "gpu-suite-e2e-cpu-tiny-opt.json").read_text())["rows"]
    assert e2e["output_tokens"] == 3 * 6 and e2e["compilations_after_warmup"] == 0
    assert e2e["prefill_token_budget"] == 64


@pytest.mark.parametrize("name", ["qwen2.5-7b", "qwen3-8b", "mistral-7b-v0.3"])
def test_byte_and_flop_counts_of_the_new_families(name):
    """What a decode step reads and a prefill multiplies, counted by hand from the published shapes:
    Qwen2's q/k/v biases and Qwen3's q/k norms are weights read but not multiplied, and Qwen3's K/V
    rows are its explicit head_dim wide."""
    m = gpu_suite.load_model(name)
    D, L, H, K, Dh, F, V = {"qwen2.5-7b": (3584, 28, 28, 4, 128, 18944, 152064),
                            "qwen3-8b": (4096, 36, 32, 8, 128, 12288, 151936),
                            "mistral-7b-v0.3": (4096, 32, 32, 8, 128, 14336, 32768)}[name]
    matrices = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
    extras = 2 * D + {"qwen2.5-7b": H * Dh + 2 * K * Dh, "qwen3-8b": 2 * Dh, "mistral-7b-v0.3": 0}[name]
    assert m.weight_bytes() == 2 * (L * (matrices + extras) + 2 * V * D + D)  # bf16; untied head
    assert m.linear_params() == L * matrices
    assert m.kv_bytes_per_token() == 2 * L * K * Dh * 2


def test_decode_part_runs_on_tiny_qwen3(tmp_path, capsys):
    """The GPU run's decode part for Qwen3 (q/k norm, head_dim apart from hidden / heads), on the CPU."""
    out = tmp_path / "suite"
    out.mkdir()  # rates given, not measured: the part reads them from here
    (out / "ceilings-cpu.json").write_text(json.dumps({"read_tb_per_s": 0.02, "copy_tb_per_s": 0.01}))
    assert gpu_suite.main(["--parts", "decode", "--models", "tiny-qwen3", "--batches", "1", "--contexts", "32",
                           "--repeats", "1", "--out", str(out)]) == 0
    assert "FAILED" not in capsys.readouterr().out
    rows = json.loads((out / "gpu-suite-decode-cpu-tiny-qwen3.json").read_text())["rows"]
    m = gpu_suite.load_model("tiny-qwen3")
    (r,) = rows  # batch 1 at context 32: the weights and 33 tokens' K/V
    assert r["floor_bytes"] == m.weight_bytes() + 33 * m.kv_bytes_per_token() and r["engine_ms"] > 0
    assert r["floor_ms"] == pytest.approx(r["floor_bytes"] / 0.02e9)


def test_sampling_and_start_parts(tmp_path, capsys):
    """The sampling part times the same decode step greedy, with sampled rows and with a logprob row;
    the start part starts an engine twice, the second time from the compile cache the first filled."""
    out = tmp_path / "suite"
    rc = gpu_suite.main(["--parts", "start,sampling", "--models", "tiny-opt", "--sampling-batches", "2",
                         "--sampling-context", "16", "--repeats", "1", "--start-max-len", "32",
                         "--start-config", '{"prefill_token_budget": 32, "max_decode_batch": 2}',
                         "--start-cache", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0 and "FAILED" not in capsys.readouterr().out
    (row,) = json.loads((out / "gpu-suite-sampling-cpu-tiny-opt.json").read_text())["rows"]
    for kind in ("one_sampled", "all_sampled", "one_logprobs"):
        assert row[f"{kind}_ms"] > 0 and row[f"{kind}_x"] == pytest.approx(row[f"{kind}_ms"] / row["greedy_ms"])
    (start,) = json.loads((out / "gpu-suite-start-cpu-tiny-opt.json").read_text())["rows"]
    assert start["cold"]["cache_hits"] == 0 and start["warm"]["cache_hits"] == start["warm"]["compilations"] > 0
    # the step programs the cold start compiled, the warm one loads whole (neither traced nor compiled)
    assert start["warm"]["store"]["loaded"] == start["cold"]["store"]["saved"] > 0
    assert start["same_tokens"] and start["warm"]["store"]["built"] == 0 and start["warm"]["compilations"] < start["cold"]["compilations"]
    assert start["cold"]["tokens"] == start["warm"]["tokens"] == 4 and start["warm_start_s"] > 0
    assert start["cold"]["slowest"] and all(s >= 0 for _, s in start["cold"]["slowest"])


def test_one_call_writes_the_floor_report(tmp_path):
    """``--floor-out``: the decode, kernel and sampling rows of one call in the report's fields, the
    kernel timed as the engine calls it (in the interpreter here) against the read rate of the call."""
    out, floor = tmp_path / "suite", tmp_path / "gpu-floor.json"
    rc = gpu_suite.main(["--parts", "ceilings,decode,kernel,sampling", "--models", "tiny-llama", "--batches", "2",
                         "--contexts", "32", "--sampling-batches", "2", "--sampling-context", "32", "--repeats", "1",
                         "--kernel-reps", "2", "--out", str(out), "--floor-out", str(floor)])
    assert rc == 0
    report = json.loads(floor.read_text())
    read = report["ceilings"]["read_tb_per_s"]
    (d,) = report["decode"]
    assert (d["model"], d["batch"], d["ctx"]) == ("tiny-llama", 2, 32)
    assert d["read_floor_ms"] > 0 and d["copy_floor_ms"] > 0 and d["step_ms"] > 0
    (k,) = report["kernel"]
    assert (k["batch"], k["ctx"]) == (2, 32) and k["kv_heads"] < k["q_heads"]  # tiny-llama is GQA
    assert k["read_share"] == pytest.approx(k["TBps"] / read)
    (s,) = report["sampling"]
    assert s["greedy_ms"] > 0 and s["all_sampled_x"] == pytest.approx(s["all_sampled_ms"] / s["greedy_ms"])
    assert report["warm_start_s"] == {} and report["cold_start_s"] == {}
