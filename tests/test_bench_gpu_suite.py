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
                         "--trace", "2:32", "--e2e", "3:16:6", "--repeats", "2", "--out", str(out),
                         "--trace-dir", str(tmp_path / "traces")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "FAILED" not in text and "==== summary ====" in text
    ceil = json.loads((out / "ceilings-cpu.json").read_text())
    assert ceil["copy_tb_per_s"] > 0 and ceil["matmul_tflop_per_s"] > 0
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
    (prof,) = json.loads((out / "gpu-suite-profile-cpu-tiny-opt.json").read_text())["rows"]
    fitted = json.loads((out / "profile-cpu-tiny-opt.json").read_text())
    assert fitted["model"] == "tiny-opt" and "1" in fitted["fits"] and prof["decode_mean_rel_err"] >= 0
    for r in decode:
        assert r["sync_ms"] > 0
    (e2e,) = json.loads((out / "gpu-suite-e2e-cpu-tiny-opt.json").read_text())["rows"]
    assert e2e["output_tokens"] == 3 * 6 and e2e["compilations_after_warmup"] == 0
