"""The engine micro-benchmark runs end to end through the CLI and writes a complete JSON report."""

from __future__ import annotations

import json

from distllm_jax.cli import main


def test_engine_micro_benchmark(converted, tmp_path, capsys):
    _, ckpt = converted("opt-pre-ln")
    out = tmp_path / "micro.json"
    rc = main([
        "bench", "engine", "--checkpoint", str(ckpt), "--prefill-tp", "2", "--decode-tp", "2",
        "--page-size", "4", "--prefill-tokens", "32,64", "--prompt-len", "16", "--output-len", "4",
        "--batches", "1,4", "--contexts", "20", "--migrate-lens", "16", "--repeats", "1", "--e2e", "4",
        "--out", str(out),
    ])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["tokens"] for r in res["prefill"]] == [32, 64]
    assert [(r["batch"], r["context"]) for r in res["decode"]] == [(1, 20), (4, 20)]
    assert res["migration"][0]["pages"] == 4 and res["migration"][0]["ms"] > 0
    assert res["e2e"]["requests"] == 4 and res["e2e"]["output_tokens_per_s"] > 0
    assert not res["shared_devices"]
    table = capsys.readouterr().out
    assert "decode batch" in table and "end to end" in table
