"""bench/kv_pull_processes end to end on the CPU: a child process offers, this one pulls, and the
benchmark's own checks (pages bit for bit, first and decoded tokens) hold in what it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pull_between_two_processes_is_bit_exact(tmp_path):
    out = tmp_path / "pull.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-m", "bench.kv_pull_processes", "--preset", "tiny-opt", "--lengths",
                          "5,40", "--repeats", "1", "--new-tokens", "3", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["two_processes"] and res["bit_exact"] == [True, True]
    assert res["first_tokens_equal"] and res["decoded_equal"]
    assert [r["pages"] for r in res["rows"]] == [1, 3] and all(r["transfer_server_GBps"] > 0 for r in res["rows"])
