"""`distllm convert` on the embedded default and `distllm info`; restore casts and errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from distllm_jax.checkpoint import CheckpointError, read_meta, restore_params
from distllm_jax.cli import main
from distllm_jax.tokenizer import load_tokenizer
from model_runner import greedy_generate


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny"
    assert main(["convert", "--out", str(out), "--quiet"]) == 0
    return out


def test_default_convert_and_info(default_ckpt, capsys):
    assert main(["info", str(default_ckpt)]) == 0
    text = capsys.readouterr().out
    assert "6,765,824" in text and "bfloat16: 13,531,648" in text and "family                    opt" in text
    assert main(["info", str(default_ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 6_765_824 and info["bytes_per_dtype"] == {"bfloat16": 13_531_648}
    assert info["config"]["num_layers"] == 2


def test_default_model_generates(default_ckpt):
    cfg, params = restore_params(default_ckpt)
    assert params["layers"][0]["attn"]["wq"].dtype == jnp.bfloat16
    tok = load_tokenizer(default_ckpt)
    ids = tok.encode("Disaggregated serving").ids
    assert tok.decode(ids) == "Disaggregated serving"
    out = greedy_generate(params, cfg, [ids], 5, dtype=jnp.bfloat16)
    assert len(out[0]) == 5 and all(0 <= t < cfg.vocab_size for t in out[0])


def test_restore_casts_dtype(default_ckpt):
    _, p32 = restore_params(default_ckpt, dtype=np.float32)
    _, p16 = restore_params(default_ckpt)
    a, b = p32["embed"]["tokens"], p16["embed"]["tokens"]
    assert a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(np.float32))


def test_restore_reports_bad_metadata(default_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(default_ckpt, bad)
    meta = read_meta(bad)
    meta["tensors"]["layers.1.mlp.w_up"][0] = [128, 7]
    (bad / "distllm.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.1\.mlp\.w_up' has shape \(128, 7\)"):
        restore_params(bad)
    with pytest.raises(CheckpointError, match="not a distllm checkpoint"):
        restore_params(tmp_path)


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "distllm_jax.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "convert" in res.stdout and "info" in res.stdout
    res = subprocess.run([sys.executable, "-m", "distllm_jax.cli", "info", "/nonexistent"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not a distllm checkpoint" in res.stderr
