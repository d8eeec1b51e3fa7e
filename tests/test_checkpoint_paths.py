"""Relative checkpoint paths everywhere (the README's example as written, serve's load, the bench), and a
symlinked ``--out``."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from pathlib import Path

import pytest

from distllm_jax.checkpoint import write_random
from distllm_jax.cli import main
from distllm_jax.models.presets import preset

README = Path(__file__).resolve().parent.parent / "README.md"
TINY = preset("tiny-opt")


def _readme_block(section: str) -> list[str]:
    """The command lines of the first bash block under the README's ``## section`` heading."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_checkpoint_example_runs_as_written(hf_checkpoints, tmp_path, monkeypatch, capsys):
    hf_dir, _ = hf_checkpoints("opt-pre-ln")
    work = tmp_path / "fresh"
    work.mkdir()
    monkeypatch.chdir(work)
    lines = _readme_block("Checkpoints")
    assert any("--out ckpt/" in line for line in lines), "the README's example uses relative paths"
    for line in lines:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "distllm"
        argv = [str(hf_dir) if a == "/path/to/hf-model" else a for a in argv[1:]]
        assert main([*argv, "--quiet"] if argv[0] == "convert" else argv) == 0, line
    out = capsys.readouterr().out
    assert f"checkpoint   {work / 'ckpt' / 'my-model'}" in out
    assert f"wrote {work / 'ckpt' / 'tiny'}: opt 6.77M params" in out
    # what `distllm serve --checkpoint ckpt/my-model` loads, from the same relative path
    import jax

    from distllm_jax.engine import CheckpointSource
    from distllm_jax.engine.params_source import stage_tensor_names
    from distllm_jax.parallel import make_mesh

    src = CheckpointSource("ckpt/my-model")
    names = stage_tensor_names(src.cfg, 0, src.cfg.num_layers, True, True)
    params = src.load(make_mesh(jax.devices()[:1]), names)
    assert params["embed"]["tokens"].shape[0] == src.cfg.vocab_size
    assert sorted(p.name for p in (work / "ckpt").iterdir()) == ["my-model", "tiny"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_symlinked_out_is_refused(tmp_path, capsys, overwrite):
    real = tmp_path / "elsewhere"
    real.mkdir()
    (real / "precious.txt").write_text("keep")
    link = tmp_path / "ckpt"
    link.symlink_to(real)
    rc = main(["convert", "--out", str(link), "--quiet", *(["--overwrite"] if overwrite else [])])
    assert rc == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert [p.name for p in real.iterdir()] == ["precious.txt"]


def test_kick_the_tires_resolves_the_checkpoint(tmp_path, monkeypatch, capsys):
    from bench.kick_the_tires import serve_arguments

    monkeypatch.chdir(tmp_path)
    write_random(TINY, "ckpt/x", progress=False)
    args = argparse.Namespace(checkpoint="ckpt/x", serve_arg=["--max-seq-len", "256"])
    assert serve_arguments(args) == ["--checkpoint", str(tmp_path / "ckpt" / "x"), "--max-seq-len", "256"]
    rc = main(["bench", "kick-the-tires", "--checkpoint", "ckpt/missing", "--results", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "distllm bench: error:" in err and "not a distllm checkpoint" in err and "Traceback" not in err


def test_kick_the_tires_reports_a_server_that_fails_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_random(TINY, "ckpt/x", progress=False)
    shutil.rmtree(tmp_path / "ckpt" / "x" / "params")  # the metadata reads, the weights do not
    rc = main(["bench", "kick-the-tires", "--checkpoint", "ckpt/x", "--modes", "colocated",
               "--results", str(tmp_path / "r"), "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.strip() == "distllm bench kick-the-tires: error: the colocated server exited"
