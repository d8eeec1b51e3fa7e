"""The executable store: a second start of the same model and layout takes its programs from
disk whole (traced none of them, compiled none), serves the same tokens; a key changes with anything
a program is built from; a damaged entry is rebuilt, never a failed start."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distllm_jax.engine.executable_store import ExecutableStore, Unkeyable, program_key, stable_repr

SCRIPT = """
import collections, json, sys
import jax
traced = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, fun_name="", **_: traced.update([fun_name]) if event.endswith("jaxpr_trace_duration") else None)
from distllm_jax import compile_cache
compile_cache.enable(sys.argv[1])
from distllm_jax.engine import DeviceRandomSource, Engine, EngineConfig, SamplingParams, compile_counter
from distllm_jax.engine.executable_store import default_store
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.presets import preset
compile_counter.install()
cfg = ModelConfig.from_hf_dict(preset("tiny-llama"))
ecfg = EngineConfig(mode="colocated", max_seq_len=32, max_decode_batch=2, prefill_token_budget=32, num_pages=32,
                    compile_threads=int(sys.argv[2]), progress=False)
engine = Engine(DeviceRandomSource(cfg, "float32", seed=0), ecfg)
at_start = compile_counter.compilations()
out = engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True)).result()
after = compile_counter.compilations() - at_start
engine.shutdown()
st = default_store().stats
print(json.dumps({"tokens": list(out.token_ids), "loaded": st.loaded, "built": st.built, "saved": st.saved,
                  "from_jax_cache": st.from_jax_cache,
                  "errors": st.errors, "after": after,
                  "traces": {n: traced[n] for n in ("stage_step", "sample_rows", "row_logprobs", "prompt_logprobs",
                                                    "copy_pages")},
                  "programs": engine.instances[0].num_programs()}))
"""


def _start(cache, threads: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cache), str(threads)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_start_loads_its_programs_and_traces_none(tmp_path):
    cache = tmp_path / "cache"
    first = _start(cache)
    # every program an instance runs: the steps, and the sampling, log-probability and page-copy ones
    assert first["built"] == first["saved"] > first["programs"] > 0 and first["loaded"] == 0, first
    assert first["traces"]["stage_step"] == first["programs"] and all(first["traces"].values())
    second = _start(cache, threads=2)  # on threads too, as a GPU start builds them
    assert second["loaded"] == first["built"] and second["built"] == 0 and not second["errors"], second
    assert not any(second["traces"].values()), second["traces"]
    assert second["tokens"] == first["tokens"] and len(first["tokens"]) == 6
    assert second["after"] == first["after"] == 0  # serving compiles nothing new either way

    entries = list((cache / "executables").iterdir())
    for entry in entries:  # damaged entries: dropped, and the programs built again
        entry.write_bytes(entry.read_bytes()[: 100])
    third = _start(cache)
    assert third["built"] == first["built"] and third["loaded"] == 0 and len(third["errors"]) == first["built"]
    assert third["tokens"] == first["tokens"]
    # built from jax's persistent cache (which the first start filled): run, never stored
    assert third["from_jax_cache"] == first["built"] and third["saved"] == 0
    assert not any(e.exists() for e in entries)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    layers: int
    name: str = "m"


def _scaled(x, *, k):
    return x * k


def _apply(x, *, fn):
    return fn(x)


def test_key_follows_what_the_program_is_built_from():
    f = jax.jit(_scaled, static_argnames=("k",))
    a = jnp.ones((4, 8))
    base = program_key("f", (a,), {}, {"k": 2, "cfg": _Cfg(2)})
    assert base == program_key("f", (jnp.zeros((4, 8)),), {}, {"k": 2, "cfg": _Cfg(2)})  # values do not matter
    others = [
        program_key("g", (a,), {}, {"k": 2, "cfg": _Cfg(2)}),
        program_key("f", (jnp.ones((4, 9)),), {}, {"k": 2, "cfg": _Cfg(2)}),
        program_key("f", (jnp.ones((4, 8), jnp.bfloat16),), {}, {"k": 2, "cfg": _Cfg(2)}),
        program_key("f", (np.ones((4, 8), np.float32),), {}, {"k": 2, "cfg": _Cfg(2)}),  # host, not placed
        program_key("f", (jax.device_put(a, jax.devices()[1]),), {}, {"k": 2, "cfg": _Cfg(2)}),
        program_key("f", (a,), {}, {"k": 3, "cfg": _Cfg(2)}),
        program_key("f", (a,), {}, {"k": 2, "cfg": _Cfg(3)}),
        program_key("f", ((a,),), {}, {"k": 2, "cfg": _Cfg(2)}),
    ]
    assert len({base, *others}) == len(others) + 1
    assert f(a, k=2).shape == (4, 8)


def test_static_arguments_without_a_value_description_are_not_stored():
    assert stable_repr(functools.partial(_scaled, k=2)) == stable_repr(functools.partial(_scaled, k=2))
    with pytest.raises(Unkeyable):
        stable_repr(lambda x: x)
    with pytest.raises(Unkeyable):
        stable_repr(object())


def test_unkeyable_program_is_built_not_stored_and_builds_are_kept(tmp_path):
    store = ExecutableStore(tmp_path / "s")
    g = jax.jit(_apply, static_argnames=("fn",))
    a = jnp.arange(6.0)
    out = store.build("apply", g, (a,), {}, {"fn": lambda x: x + 1}, tuple(a.devices()))
    np.testing.assert_array_equal(np.asarray(out(a)), np.arange(6.0) + 1)
    assert store.stats.unkeyable == 1 and store.stats.saved == 0 and not any((tmp_path / "s").iterdir())
    f = jax.jit(_scaled, static_argnames=("k",))
    first = store.build("scaled", f, (a,), {}, {"k": 3}, tuple(a.devices()))
    assert store.build("scaled", f, (a,), {}, {"k": 3}, tuple(a.devices())) is first  # built once a process
    assert store.stats.built == 2 and store.stats.saved + store.stats.from_jax_cache == 1
    assert json.dumps(dataclasses.asdict(store.stats))


def test_store_keeps_within_its_size_dropping_the_least_recently_used(tmp_path):
    store = ExecutableStore(tmp_path / "s")
    f = jax.jit(_scaled, static_argnames=("k",))
    a = jnp.arange(4.0)
    compiled = f.lower(a, k=5).compile()
    store.save("new", compiled)
    size = (store.root / "new.jaxexe").stat().st_size
    olds = []
    for i in range(3):
        e = store.root / f"old{i}.jaxexe"
        e.write_bytes(b"x" * 100)
        os.utime(e, (1000 + i, 1000 + i))
        olds.append(e)
    store.max_bytes = size + 250  # room for the new entry and two old ones
    store.save("new", compiled)
    assert (store.root / "new.jaxexe").exists()
    assert [e.exists() for e in olds] == [False, True, True]  # the least recently used went


def test_a_store_that_cannot_write_says_why_and_keeps_nothing(tmp_path):
    import threading

    store = ExecutableStore(tmp_path / "s")
    # the entry's temporary file cannot be written: a folder stands at its name (as a full disk would fail it)
    (store.root / f"k.tmp{os.getpid()}.{threading.get_ident()}").mkdir()
    f = jax.jit(_scaled, static_argnames=("k",))
    a = jnp.arange(3.0)
    compiled = f.lower(a, k=7).compile()
    store.save("k", compiled)
    assert store.stats.saved == 0 and "not stored" in store.stats.errors[0]
    assert not (store.root / "k.jaxexe").exists()
    np.testing.assert_array_equal(np.asarray(compiled(a)), np.arange(3.0) * 7)


def test_runtime_fingerprint_follows_xla_flags(monkeypatch):
    from distllm_jax.engine import executable_store

    before = executable_store.runtime_fingerprint()
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_dump_hlo_as_text")
    executable_store.runtime_fingerprint.cache_clear()
    try:
        assert executable_store.runtime_fingerprint() != before
    finally:
        monkeypatch.undo()
        executable_store.runtime_fingerprint.cache_clear()
    assert executable_store.runtime_fingerprint() == before
