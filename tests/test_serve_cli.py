"""`distllm serve --help`: every flag explained, defaults shown, and how to keep the token out of `ps`."""

from __future__ import annotations

import argparse

import pytest

from distllm_jax.cli import build_parser


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_every_serve_flag_has_help_and_shows_its_default(capsys):
    p = serve_parser()
    flags = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert flags and not [a.option_strings[0] for a in flags if not a.help]
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 50051)", "(default: tiny-opt)", "(default: 0)", "(default: 300.0)"):
        assert shown in text, shown
    assert "(default: None)" not in text


def test_help_says_the_env_var_keeps_the_token_out_of_ps(capsys):
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "DISTLLM_AUTH_TOKEN, which keeps the token out of `ps`" in text
