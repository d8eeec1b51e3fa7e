"""`distllm serve --help` and `generate --help`: every flag explained, defaults shown, plain text (no
reST markup), and how to keep the token out of `ps`."""

from __future__ import annotations

import argparse

import pytest

from distllm_jax.cli import build_parser


def subparser(name: str = "serve") -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def serve_parser() -> argparse.ArgumentParser:
    return subparser("serve")


@pytest.mark.parametrize("command,shown", [
    ("serve", ("(default: 50051)", "(default: tiny-opt)", "(default: 0)", "(default: 300.0)")),
    ("generate", ("(default: 127.0.0.1:50051)", "(default: 64)")),
])
def test_every_flag_has_help_and_shows_its_default(capsys, command, shown):
    p = subparser(command)
    flags = [a for a in p._actions if a.dest != "help"]
    assert flags and not [a.dest for a in flags if not a.help]
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in shown:
        assert s in text, s
    assert "(default: None)" not in text and "(default: [])" not in text and "``" not in text


def test_help_says_the_env_var_keeps_the_token_out_of_ps(capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DISTLLM_AUTH_TOKEN, which keeps the token out of `ps`" in text


def test_kv_flags_reach_the_engine_config():
    from serve.cli import engine_config

    args = serve_parser().parse_args(["--kv-admission", "reserve", "--preemption", "swap", "--kv-watermark", "0.05"])
    cfg = engine_config(args, 1)
    assert (cfg.kv_admission, cfg.preemption, cfg.kv_watermark) == ("reserve", "swap", 0.05)
    default = engine_config(serve_parser().parse_args([]), 1)
    assert (default.kv_admission, default.preemption) == ("on-demand", "recompute")
    assert default.prefix_cache  # on unless --no-prefix-cache, as in vLLM and SGLang
    assert not engine_config(serve_parser().parse_args(["--no-prefix-cache"]), 1).prefix_cache
    assert engine_config(serve_parser().parse_args(["--no-prefix-cache", "--prefix-cache"]), 1).prefix_cache
    assert engine_config(serve_parser().parse_args(["--prefill-routing", "round-robin"]), 1).prefill_routing == "round-robin"
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--preemption", "drop"])
