"""The layering the code promises: the library never imports ``bench`` or ``serve`` (not even its
console entry point, ``distllm_jax/cli.py``, which mounts their commands through entry points),
``pallas_kernels`` imports nothing of the project, no two modules import each other (directly or
round a longer loop), no module (nor a test) imports another module's private names, and each
BUILD.bazel target depends on exactly the project packages its files import. Read from the source, so
an import inside a function, or under ``if TYPE_CHECKING:``, counts too."""

from __future__ import annotations

import ast
from collections import deque
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
    assert offenders("distllm_jax", {"bench", "serve"}) == []


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


# ---- the module graph ---------------------------------------------------------------------------


def dotted(root: Path, path: Path) -> str:
    """``root/a/b/c.py`` -> ``a.b.c``; a package is its ``__init__.py`` (``a/b/__init__.py`` -> ``a.b``)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages=PROJECT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` under ``root``."""
    return {dotted(root, path): path for package in packages for path in sorted((root / package).rglob("*.py"))}


def _known(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module (``a.b.attr`` -> ``a.b``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mods:
            return ".".join(parts[:n])
    return None


def _imports(root: Path, path: Path, mods: dict[str, Path]):
    """(tree, [(node, module, name)]) for each import in ``path`` of a project module: ``name`` is
    what ``from module import name`` takes (None for ``import module``); a relative import is
    resolved against ``path``'s package."""
    tree = ast.parse(path.read_text(), str(path))
    here = dotted(root, path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name, None) for a in node.names if _known(a.name, mods)]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # ``module.name`` known: a namespace package's modules count too
            out += [(node, module, a.name) for a in node.names if _known(f"{module}.{a.name}", mods)]
    return tree, out


def module_imports(root: Path, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports: ``from pkg import name`` is ``pkg.name`` when that is a
    module, else ``pkg``."""
    return {_known(f"{module}.{name}" if name else module, mods) for _, module, name in _imports(root, path, mods)[1]}


def graph(root: Path, packages=PROJECT) -> dict[str, set[str]]:
    """Module -> the project modules it names in an import. Only what an import names: that Python
    runs ``a/__init__.py`` before ``a.b`` is not an edge, so a package re-exporting its submodules'
    names is no loop with them; a submodule importing the package (``from a import X``) is."""
    mods = modules(root, packages)
    return {m: module_imports(root, p, mods) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[str]:
    """One loop, as ``a -> b -> a``, for each group of modules that reach each other (Tarjan's
    strongly connected components): a shortest loop through the group's first module, and the
    group's other modules, if any, after it."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):  # recursion is fine: the graph is a few hundred modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(g):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        start = min(group)
        prev, todo = {start: None}, deque([start])
        while todo:  # breadth first inside the group, back to ``start``
            v = todo.popleft()
            if start in g[v]:
                loop = [v]
                while prev[loop[-1]] is not None:
                    loop.append(prev[loop[-1]])
                rest = sorted(group - set(loop))
                out.append(" -> ".join([*reversed(loop), start]) + (f" (with {', '.join(rest)})" if rest else ""))
                break
            for w in sorted(g[v] & group):
                if w not in prev:
                    prev[w] = v
                    todo.append(w)
    return sorted(out)


def test_no_module_import_cycles():
    found = cycles(graph(ROOT))
    assert not found, "import cycles:\n" + "\n".join(found)


@pytest.mark.parametrize("files,expect", [
    ({"a.py": "import p.b\n", "b.py": "def f():\n    from p.a import x\n"}, ["p.a -> p.b -> p.a"]),
    ({"a.py": "from p import b\n", "b.py": "from p import c\n", "c.py": "import p.a as a\n"},
     ["p.a -> p.b -> p.c -> p.a"]),
    ({"__init__.py": "", "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.b import B\n",
      "b.py": "from p.a import A\n"}, ["p.a -> p.b -> p.a"]),
    # ``from p import name``: the package when ``name`` is not a module
    ({"__init__.py": "from p.a import A\n", "a.py": "from p import b\n", "b.py": "from p import A\n"},
     ["p -> p.a -> p.b -> p"]),
    ({"__init__.py": "from p.a import A\n", "a.py": "from p.b import B\n", "b.py": "import os\n"}, []),
    ({"a.py": "from . import b\n", "b.py": "from .a import A\n"}, ["p.a -> p.b -> p.a"]),  # relative
    ({"a.py": "import p.b\n", "b.py": "import p.a, p.c\n", "c.py": "import p.a\n"}, ["p.a -> p.b -> p.a (with p.c)"]),
])
def test_the_cycle_check_finds_loops(tmp_path, files, expect):
    (tmp_path / "p").mkdir()
    for name, text in files.items():
        (tmp_path / "p" / name).write_text(text)
    assert cycles(graph(tmp_path, ("p",))) == expect


# ---- private names ------------------------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(root: Path, path: Path, mods: dict[str, Path]) -> list[str]:
    """Where ``path`` takes a private name (``_x``, not a dunder) of a project module: ``from m import
    _x``, ``import m._x``, or ``m._x`` on a module it imported."""
    tree, imports = _imports(root, path, mods)
    out, bound = [], {}  # local name -> the project module it is
    for node, module, name in imports:
        if name is None:
            if any(_private(p) for p in module.split(".")):
                out.append(f"{node.lineno}: import {module}")
            top = module.split(".")[0]
            for a in node.names:
                if a.name == module:
                    bound[a.asname or top] = module if a.asname else top
        elif _private(name):
            out.append(f"{node.lineno}: from {module} import {name}")
        elif f"{module}.{name}" in mods:
            asname = next(a.asname for a in node.names if a.name == name)
            bound[asname or name] = f"{module}.{name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            parts, base = [], node.value
            while isinstance(base, ast.Attribute):
                parts.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                target = ".".join([bound[base.id], *reversed(parts)])
                if target in mods:
                    out.append(f"{node.lineno}: {target}.{node.attr}")
    return out


def private_offenders(root: Path, packages=PROJECT, also=("tests",)) -> list[str]:
    mods = modules(root, packages)
    return [f"{p.relative_to(root).as_posix()}:{use}"
            for package in (*packages, *also) for p in sorted((root / package).rglob("*.py"))
            for use in private_uses(root, p, mods)]


def test_no_module_imports_another_modules_private_names():
    found = private_offenders(ROOT)
    assert not found, "private names imported across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("source,expect", [
    ("from p.a import _x, y\n", ["1: from p.a import _x"]),
    ("def f():\n    from p.a import _x as x\n", ["2: from p.a import _x"]),
    ("from p import _hidden\n", ["1: from p import _hidden"]),
    ("import p._hidden\n", ["1: import p._hidden"]),
    ("import p.a\np.a._x()\n", ["2: p.a._x"]),
    ("import p.a as m\nm._x\n", ["2: p.a._x"]),
    ("from p import a\na._x\n", ["2: p.a._x"]),
    ("from p.a import __version__, y\nimport os\nos._exit\n", []),
    ("from p.a import y\ny._z\n", []),  # ``y`` is not a module: its attributes are its own business
])
def test_the_private_check_sees_every_spelling(tmp_path, source, expect):
    (tmp_path / "p").mkdir()
    for name in ("__init__.py", "a.py", "_hidden.py"):
        (tmp_path / "p" / name).write_text("")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "m.py").write_text(source)
    assert private_offenders(tmp_path, ("p",), ("user",)) == [f"user/m.py:{e}" for e in expect]


# ---- the build graph ----------------------------------------------------------------------------


def bazel_targets(build: Path) -> dict[str, tuple[list[str], set[str]]]:
    """Rule name -> (the source patterns, the ``:deps``) of each py_library, py_binary and py_test of a
    BUILD file (read as the Python it is written in); a py_test made per test file is named ``tests``,
    with the patterns of the files it can run."""
    out = {}
    for node in ast.walk(ast.parse(build.read_text(), str(build))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("py_library", "py_binary", "py_test")):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        srcs = kw["srcs"].args[0] if isinstance(kw["srcs"], ast.Call) else kw["srcs"]  # glob([...]) or [...]
        patterns = [e.value for e in srcs.elts if isinstance(e, ast.Constant)]
        name = kw["name"].value if isinstance(kw["name"], ast.Constant) else "tests"
        if name == "tests":
            patterns.append("tests/**/*.py")
        deps = {e.value.lstrip(":") for e in kw.get("deps", ast.List(elts=[])).elts}
        out[name] = (patterns, deps)
    return out


def target_imports(root: Path, patterns: list[str], own: str | None = None) -> set[str]:
    """The project packages the files of ``patterns`` import, but ``own``."""
    return {p for pattern in patterns for f in root.glob(pattern) for p in imported(f) & set(PROJECT)} - {own}


def test_bazel_deps_are_the_imports():
    targets = bazel_targets(ROOT / "BUILD.bazel")
    assert set(PROJECT) | {"distllm", "tests"} <= set(targets)
    wrong = [f"{name}: deps {sorted(deps)}, imports {sorted(got)}"
             for name, (patterns, deps) in sorted(targets.items())
             if deps != (got := target_imports(ROOT, patterns, name))]
    assert not wrong, "BUILD.bazel's deps differ from the imports:\n" + "\n".join(wrong)


def test_the_build_check_reads_globs_lists_and_generated_tests(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "m.py").write_text("import serve\n")
    (tmp_path / "BUILD.bazel").write_text(
        'py_library(name = "p", srcs = glob(["p/**/*.py"], exclude = X), deps = [":serve"])\n'
        'py_binary(name = "b", srcs = ["p/m.py"])\n'
        '[py_test(name = src, srcs = ["p/m.py", src], deps = [":p"]) for src in glob(["t/*.py"])]\n')
    targets = bazel_targets(tmp_path / "BUILD.bazel")
    assert targets == {"p": (["p/**/*.py"], {"serve"}), "b": (["p/m.py"], set()),
                       "tests": (["p/m.py", "tests/**/*.py"], {"p"})}
    assert target_imports(tmp_path, ["p/**/*.py"], "p") == {"serve"}
