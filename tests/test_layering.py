"""The layering the code promises: the library never imports ``bench`` or ``serve`` (only its console
entry point, ``distllm_jax/cli.py``, mounts their commands), and ``pallas_kernels`` imports nothing of
the project. Read from the source, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("distllm_jax", "pallas_kernels", "serve", "bench")


def imported(path: Path) -> set[str]:
    """Top-level package names ``path`` imports (absolute imports only; relative ones stay inside)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(package: str, forbidden: set[str], allowed: set[str] = frozenset()) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed:
            continue
        bad = imported(path) & forbidden
        if bad:
            out.append(f"{rel} imports {sorted(bad)}")
    return out


def test_the_library_never_imports_bench_or_serve():
    assert offenders("distllm_jax", {"bench", "serve"}, {"distllm_jax/cli.py"}) == []


def test_pallas_kernels_import_nothing_of_the_project():
    assert offenders("pallas_kernels", set(PROJECT) - {"pallas_kernels"}) == []


@pytest.mark.parametrize("source,expect", [
    ("import bench.metrics\n", {"bench"}),
    ("def f():\n    from serve import cli\n", {"serve"}),
    ("from . import sibling\n", set()),
])
def test_the_check_sees_imports_anywhere(tmp_path, source, expect):
    f = tmp_path / "m.py"
    f.write_text(source)
    assert imported(f) & {"bench", "serve"} == expect
