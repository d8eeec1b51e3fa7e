"""Entry point for `bazel run //:distllm -- ARGS` (same as the `distllm` console script).

A Bazel binary has no installed metadata, so the commands pyproject.toml declares as entry points
(group ``distllm.commands``) are handed to the CLI here."""

import sys

from bench.cli import add_command as add_bench_command
from distllm_jax.cli import main
from serve.cli import add_generate_command, add_serve_command

if __name__ == "__main__":
    sys.exit(main(commands=[add_serve_command, add_generate_command, add_bench_command]))
