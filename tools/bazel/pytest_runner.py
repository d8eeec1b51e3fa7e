"""Runs one pytest file as a Bazel py_test.

Usage (set by BUILD.bazel): pytest_runner.py tests/test_foo.py [extra pytest args]

The working directory of a Bazel test is the runfiles root of this workspace,
which mirrors the repo layout (distllm_jax/, tests/, pyproject.toml, ...), so
relative paths work and the project packages import from there.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    if not argv:
        print("pytest_runner.py: no test file given", file=sys.stderr)
        return 2

    # Make the project packages importable as top-level packages whatever
    # Bazel put on sys.path, and let subprocesses spawned by tests see them.
    root = os.getcwd()
    if root not in sys.path:
        sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in [root, os.environ.get("PYTHONPATH", "")] if p
    )

    # Do not write bytecode/pytest caches into the runfiles tree.
    sys.dont_write_bytecode = True
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")

    import pytest

    args = list(argv) + [
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        root,
    ]
    # Put pytest's own temporary directories under Bazel's per-test tmpdir.
    test_tmpdir = os.environ.get("TEST_TMPDIR")
    if test_tmpdir:
        args += ["--basetemp", os.path.join(test_tmpdir, "pytest")]
    # Bazel's JUnit XML location, so failures show up per test case.
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args += ["--junitxml", xml]

    code = int(pytest.main(args))
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print(
            "pytest_runner.py: no tests were collected from %s; failing" % argv[0],
            file=sys.stderr,
        )
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
