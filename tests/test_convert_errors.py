"""Bad checkpoints: each error is clear and names the offending file and tensor; nothing is written."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from distllm_jax.checkpoint import CheckpointError, convert, restore_params
from distllm_jax.cli import main as cli_main

FC1 = "model.decoder.layers.1.fc1.weight"


@pytest.fixture
def hf_copy(hf_checkpoints, tmp_path):
    src, _ = hf_checkpoints("opt-pre-ln")
    dst = tmp_path / "hf"
    shutil.copytree(src, dst)
    return dst


def _rewrite(hf_dir: Path, edit) -> Path:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


def _convert(hf_dir: Path, tmp_path: Path):
    return convert(hf_dir, tmp_path / "out", dtype="float32", progress=False)


def test_missing_tensor(hf_copy, tmp_path):
    _rewrite(hf_copy, lambda t: t.pop(FC1))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.decoder\.layers\.1\.fc1\.weight'") as e:
        _convert(hf_copy, tmp_path)
    assert "model.safetensors" in str(e.value)
    assert not (tmp_path / "out").exists(), "nothing is written for a bad checkpoint"


def test_wrong_shape(hf_copy, tmp_path):
    _rewrite(hf_copy, lambda t: t.__setitem__(FC1, np.zeros((128, 63), np.float32)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.decoder\.layers\.1\.fc1\.weight' "
                                              r"has shape \(128, 63\), config\.json implies \(128, 64\)"):
        _convert(hf_copy, tmp_path)


def test_unknown_architecture(hf_copy, tmp_path):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture \['GPT2LMHeadModel'\]"):
        _convert(hf_copy, tmp_path)


@pytest.mark.parametrize(
    "keep,pattern",
    [
        (lambda size: size - 1000, r"model\.safetensors: truncated safetensors file: tensor '[^']+' needs"),
        (lambda size: 100, r"model\.safetensors: truncated safetensors file \(header needs"),
    ],
    ids=["data", "header"],
)
def test_truncated_file(hf_copy, tmp_path, keep, pattern):
    path = hf_copy / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(keep(path.stat().st_size))
    with pytest.raises(CheckpointError, match=pattern):
        _convert(hf_copy, tmp_path)


def test_unconvertible_dtype(hf_copy, tmp_path):
    _rewrite(hf_copy, lambda t: t.__setitem__(FC1, np.zeros((128, 64), np.int32)))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.decoder\.layers\.1\.fc1\.weight' has dtype I32, "
                                              r"which cannot be converted to float32"):
        _convert(hf_copy, tmp_path)


def test_sharded_missing_shard(hf_copy, tmp_path):
    tensors = load_file(hf_copy / "model.safetensors")
    os.remove(hf_copy / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, ns in files.items():
        save_file({n: tensors[n] for n in ns}, hf_copy / fname)
        weight_map.update({n: fname for n in ns})
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # the sharded checkpoint converts fine ...
    rep = _convert(hf_copy, tmp_path)
    assert rep.tensors > 0
    # ... and a missing shard is named
    os.remove(hf_copy / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: shard named in "
                                              r"model\.safetensors\.index\.json is missing"):
        convert(hf_copy, tmp_path / "out2", dtype="float32", progress=False)


def test_torch_bin_weights_only(hf_copy, tmp_path, converted):
    import torch

    tensors = load_file(hf_copy / "model.safetensors")
    os.remove(hf_copy / "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, hf_copy / "pytorch_model.bin")
    _convert(hf_copy, tmp_path)
    _, ref_ckpt = converted("opt-pre-ln")
    _, a = restore_params(tmp_path / "out")
    _, b = restore_params(ref_ckpt)
    np.testing.assert_array_equal(np.asarray(a["layers"][1]["mlp"]["w_up"]), np.asarray(b["layers"][1]["mlp"]["w_up"]))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/distllm_pwned",))


def test_torch_bin_pickle_refused(hf_copy, tmp_path):
    os.remove(hf_copy / "model.safetensors")
    with open(hf_copy / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused: not loadable with "
                                              r"torch\.load\(weights_only=True\)"):
        _convert(hf_copy, tmp_path)
    assert not Path("/tmp/distllm_pwned").exists()


def test_no_weights(hf_copy, tmp_path):
    os.remove(hf_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights found"):
        _convert(hf_copy, tmp_path)


def test_non_empty_output(hf_copy, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not empty"):
        _convert(hf_copy, tmp_path)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_cli_reports_error(hf_copy, tmp_path, capsys):
    _rewrite(hf_copy, lambda t: t.pop(FC1))
    rc = cli_main(["convert", "--hf", str(hf_copy), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "distllm convert: error:" in err and FC1 in err and "model.safetensors" in err
