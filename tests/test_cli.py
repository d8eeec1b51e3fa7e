"""`distllm convert` on the embedded default and `distllm info`; restore casts and errors; the help,
version and output behaviour of the command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import distllm_jax
from distllm_jax import cli
from distllm_jax.checkpoint import CheckpointError, read_meta, restore_params
from distllm_jax.cli import build_parser, main, si_count
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


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, parser) of the command tree."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


# `serve` and `generate` take their flags from serve/cli.py, which the server's owners document
SERVER_COMMANDS = {("serve",), ("generate",)}


def test_every_flag_has_help_and_shows_its_default():
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text and not re.search(r"::$", text, re.M), f"reST markup in {path} --help"
        if path in SERVER_COMMANDS:
            continue
        for a in parser._actions:
            if isinstance(a, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert a.help, f"distllm {' '.join(path)} {a.option_strings or a.dest}: no help text"
            shown = a.default is not None and a.default is not False and a.default != []
            if shown and a.option_strings:
                formatter = parser._get_formatter()
                formatter.add_argument(a)
                entry = formatter.format_help()
                assert "default" in entry, f"distllm {' '.join(path)} {entry}: default {a.default!r} not shown"


def test_serve_and_bench_are_mounted_through_their_entry_points():
    """pyproject.toml declares each command of the packages above the library as an entry point naming
    a function that adds the command of its name (the library imports none: tests/test_layering.py)."""
    import tomllib
    from importlib.metadata import EntryPoint

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][cli.COMMANDS_GROUP]
    assert tuple(declared) == cli.REPOSITORY_COMMANDS
    for name, value in declared.items():
        parser = build_parser([EntryPoint(name, value, cli.COMMANDS_GROUP).load()])
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        (shown,) = [a.help for a in sub._choices_actions if a.dest == name]
        assert "not available" not in shown and sub.choices[name].add_help  # the command itself, no stand-in


def test_a_command_that_is_not_installed_says_so(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    monkeypatch.setattr("importlib.metadata.entry_points", lambda **kw: [])
    assert main(["bench", "run", "--address", "127.0.0.1:1", "--help"]) == 2
    err = capsys.readouterr().err
    assert "distllm bench: error:" in err and "distllm.commands" in err and "pip install -e ." in err
    assert main(["info", "/nonexistent"]) == 2  # the library's own commands still work
    broken = [EntryPoint("serve", "no_such_module_here:add", cli.COMMANDS_GROUP)]
    monkeypatch.setattr("importlib.metadata.entry_points", lambda **kw: broken)
    assert main(["serve", "--port", "0"]) == 2
    assert "no_such_module_here:add does not import" in capsys.readouterr().err


def test_multi_gpu_help_is_for_users():
    res = subprocess.run([sys.executable, "-m", "distllm_jax.cli", "bench", "multi-gpu", "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "--part" in res.stdout
    for note in ("lent", "$OUT", "device call"):
        assert note not in res.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"distllm {distllm_jax.__version__}"


def test_info_into_a_closed_pipe(default_ckpt):
    """`distllm info CKPT | head`: the reader is gone before everything is written."""
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([sys.executable, "-m", "distllm_jax.cli", "info", str(default_ckpt)],
                             stdout=w, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(w)
    assert res.stderr == "" and res.returncode == 1


def test_info_parameter_count_and_opt_biases(default_ckpt, capsys):
    assert main(["info", str(default_ckpt)]) == 0
    text = capsys.readouterr().out
    assert "parameters   6,765,824 (6.77M) in" in text
    # tiny-opt's HF config says enable_bias: true; OPT's attention and MLP carry biases
    assert re.search(r"attention_bias\s+True", text) and re.search(r"mlp_bias\s+True", text)
    assert main(["info", str(default_ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["attention_bias"] is True
    assert [si_count(n) for n in (262_272, 999, 1_300_000_000, 6_765_824)] == ["262K", "999", "1.3B", "6.77M"]


def test_tokenizer_fallback_is_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="distllm_jax.tokenizer"):
        tok = load_tokenizer(tmp_path)
    assert tok.get_vocab_size() == 50257
    assert f"{tmp_path} has no tokenizer files" in caplog.text and "bundled GPT-2 byte-level BPE" in caplog.text
