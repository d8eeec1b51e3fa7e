"""Bad checkpoints: each error is clear and names the offending file and tensor; nothing is written,
nothing outside ``--out`` is touched, and no file outside the checkpoint directory is read."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from distllm_jax.checkpoint import CheckpointError, convert, restore_params, write_random
from distllm_jax.cli import main as cli_main
from distllm_jax.models.presets import preset

FC1 = "model.decoder.layers.1.fc1.weight"
convert_mod = importlib.import_module("distllm_jax.checkpoint.convert")  # the package re-exports the function
TINY = preset("tiny-opt")


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


def test_unknown_architecture(hf_copy, tmp_path, capsys):
    cfg = json.loads((hf_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (hf_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown architecture \['GPT2LMHeadModel'\]"):
        _convert(hf_copy, tmp_path)
    assert cli_main(["convert", "--hf", str(hf_copy), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err  # `distllm convert` lists what it can convert
    assert all(a in err for a in ("'LlamaForCausalLM'", "'MistralForCausalLM'", "'OPTForCausalLM'",
                                  "'Qwen2ForCausalLM'", "'Qwen3ForCausalLM'"))


@pytest.mark.parametrize("variant,edit,pattern", [
    ("qwen3-qknorm-headdim", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"),
     r"missing tensor 'model\.layers\.1\.self_attn\.k_norm\.weight' \(needed for layers\.1\.attn\.k_norm"),
    ("qwen3-qknorm-headdim", lambda t: t.__setitem__("model.layers.0.self_attn.q_norm.weight", np.ones(8, np.float32)),
     r"tensor 'model\.layers\.0\.self_attn\.q_norm\.weight' has shape \(8,\), config\.json implies \(16,\)"),
    ("qwen2-bias-tied", lambda t: t.pop("model.layers.0.self_attn.v_proj.bias"),
     r"missing tensor 'model\.layers\.0\.self_attn\.v_proj\.bias' \(needed for layers\.0\.attn\.bv"),
    ("mistral", lambda t: t.pop("lm_head.weight"), r"missing tensor 'lm_head\.weight'"),
])
def test_new_families_name_the_bad_tensor(hf_checkpoints, tmp_path, variant, edit, pattern):
    src, _ = hf_checkpoints(variant)
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    _rewrite(hf_dir, edit)
    with pytest.raises(CheckpointError, match=pattern):
        _convert(hf_dir, tmp_path)
    assert not (tmp_path / "out").exists()


def test_sliding_window_checkpoint_is_refused_naming_the_field(hf_checkpoints, tmp_path):
    src, _ = hf_checkpoints("mistral")
    hf_dir = tmp_path / "hf"
    shutil.copytree(src, hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "sliding_window": 64}))
    with pytest.raises(CheckpointError, match=r"config\.json: sliding_window=64 is shorter than the context"):
        _convert(hf_dir, tmp_path)


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


def test_failed_conversion_leaves_no_directory(hf_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def failing_add(self, name, array):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_add(self, name, array)

    real_add = convert_mod.ParamWriter.add
    monkeypatch.setattr(convert_mod.ParamWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        convert(hf_copy, "ckpt/tiny", dtype="float32", progress=False)
    assert not (tmp_path / "ckpt").exists(), "neither ckpt/tiny nor ckpt/ is left behind"
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_random(TINY, "ckpt/x", progress=False)
    assert not (tmp_path / "ckpt").exists()



def test_convert_touches_nothing_outside_out(hf_copy, tmp_path, monkeypatch):
    sibling = tmp_path / "out.partial_save"
    sibling.mkdir()
    (sibling / "mine.txt").write_text("not the converter's")
    out = tmp_path / "out"
    convert(hf_copy, out, dtype="float32", progress=False)
    assert (sibling / "mine.txt").read_text() == "not the converter's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out", "out.partial_save"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "the temporary directory is gone"
    _, params = restore_params(out)  # the checkpoint works after its move out of the temporary directory
    assert params["layers"][1]["mlp"]["w_up"].shape == (64, 128)



def test_overwrite_keeps_the_old_checkpoint_until_the_new_one_is_complete(hf_copy, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_random(TINY, out, progress=False)
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(convert_mod.ParamWriter, "finish", lambda self: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        convert(hf_copy, out, dtype="float32", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "distllm.json").read_text())["source"] == "random(seed=0)"
    monkeypatch.undo()
    convert(hf_copy, out, dtype="float32", overwrite=True, progress=False)
    assert json.loads((out / "distllm.json").read_text())["source"] == str(hf_copy)



def _shard(hf_dir: Path, weight_map: dict) -> None:
    os.remove(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))



def test_index_shard_outside_the_directory_is_refused(hf_copy, tmp_path):
    names = list(load_file(hf_copy / "model.safetensors"))
    _shard(hf_copy, {n: "../../../../../../etc/passwd" for n in names})
    with pytest.raises(CheckpointError, match=r"shard named in model\.safetensors\.index\.json resolves to "
                                              r"/etc/passwd, outside") as e:
        convert(hf_copy, tmp_path / "out", progress=False)
    assert "header" not in str(e.value), "the file is not opened"
    _shard_abs = {n: "/etc/passwd" for n in names}
    (hf_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": _shard_abs}))
    with pytest.raises(CheckpointError, match="outside"):
        convert(hf_copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()



def test_tokenizer_symlink_outside_is_refused(hf_copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (hf_copy / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: side file resolves to .*secret\.txt, outside"):
        convert(hf_copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()



def test_hf_hub_snapshot_symlinks_into_blobs_are_followed(hf_copy, tmp_path):
    """A snapshot of the HF hub cache links every file into the repository's blobs/."""
    repo = tmp_path / "models--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in hf_copy.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    rep = convert(snap, tmp_path / "out", dtype="float32", progress=False)
    assert rep.tensors > 0 and not (tmp_path / "out" / "config.json").is_symlink()



def test_deeply_nested_safetensors_header(hf_copy, tmp_path):
    header = b"[" * 100_000 + b"]" * 100_000
    (hf_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header \(nested too deeply\)"):
        convert(hf_copy, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
