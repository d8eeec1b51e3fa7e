"""Entry point for `bazel run //:distllm -- ARGS` (same as the `distllm` console script)."""

import sys

from distllm_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
