"""Test setup: 8 virtual CPU devices (set before jax is imported anywhere), the persistent compilation
cache the servers use (many tests build the same small engines: they load each other's programs
instead of compiling them again), shared checkpoints."""

from __future__ import annotations

import os

# The tiny test models spend far longer in LLVM than running: its cheapest optimisation level cuts
# each CPU program's build (what most of the suite's time is) and changes no result the tests check
# (no fast-math either way). The servers the tests start as subprocesses inherit it.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


def _declare_the_trees_commands() -> None:
    """``distllm serve``/``generate``/``bench`` reach the CLI through pyproject.toml's entry points
    (group ``distllm.commands``). An environment installed before they were declared, or from another
    tree, lacks them or names other functions: then the tests declare this tree's, in a metadata folder
    first on sys.path (and on PYTHONPATH, for the servers the tests start as subprocesses)."""
    import atexit
    import shutil
    import tempfile
    import tomllib
    from importlib.metadata import entry_points

    group = "distllm.commands"
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    declared = project["entry-points"][group]
    installed = {}
    for ep in entry_points(group=group):
        installed.setdefault(ep.name, ep.value)
    if installed == declared:
        return
    folder = Path(tempfile.mkdtemp(prefix="distllm-commands-"))
    atexit.register(shutil.rmtree, folder, True)
    meta = folder / "distllm_jax_source_tree-0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: distllm-jax-source-tree\nVersion: 0\n")
    (meta / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)


_declare_the_trees_commands()

from distllm_jax import compile_cache  # noqa: E402

compile_cache.enable(compile_cache.default_dir())

from hf_models import HF_VARIANTS, make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Small random HF checkpoints written by ``save_pretrained`` (one per variant), built lazily."""
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, tuple[Path, object]] = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = make_hf_checkpoint(variant, root / variant)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def converted(hf_checkpoints, tmp_path_factory):
    """variant -> (hf model, converted float32 checkpoint dir), converted once per session."""
    from distllm_jax.checkpoint import convert

    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, tuple[object, Path]] = {}

    def get(variant: str):
        if variant not in cache:
            hf_dir, model = hf_checkpoints(variant)
            convert(hf_dir, root / variant, dtype="float32", progress=False)
            cache[variant] = (model, root / variant)
        return cache[variant]

    return get


__all__ = ["HF_VARIANTS"]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop jax's in-memory compiled programs. XLA's CPU JIT maps memory for
    every program it loads and keeps it while the program is cached; a whole suite in one process
    aborted in LLVM's RuntimeDyld::emitSection, most likely at the kernel's limit of 65,530 maps.
    Later modules load what they need again from the persistent cache."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
