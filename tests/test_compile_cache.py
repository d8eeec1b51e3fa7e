"""The persistent compilation cache: a second process with the same programs loads them instead of
compiling; another program only misses (jax keys entries on the program itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
from distllm_jax import compile_cache
from distllm_jax.engine import compile_counter
compile_counter.install()
compile_cache.enable(sys.argv[1])
import jax, jax.numpy as jnp
n = int(sys.argv[2])
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
f(jnp.ones((n, 8))).block_until_ready()
print(json.dumps({"compiles": compile_counter.compilations(), "hits": compile_counter.cache_hits()}))
"""


def _run(cache, n: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(n)], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_start_loads_and_another_program_misses(tmp_path):
    cache = tmp_path / "jax-cache"
    first = _run(cache, 16)
    assert first["compiles"] >= 1 and first["hits"] == 0 and any(cache.iterdir())
    second = _run(cache, 16)  # every program it builds comes from the cache
    assert second["hits"] == second["compiles"] == first["compiles"]
    other = _run(cache, 24)  # another shape is another program: built anew, not taken from the cache
    assert other["hits"] < other["compiles"]


def test_default_dir_is_under_the_user_cache(monkeypatch, tmp_path):
    from distllm_jax.compile_cache import default_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_dir() == tmp_path / "distllm" / "jax-compile"
