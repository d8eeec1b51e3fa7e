"""Start-up builds the step programs on several threads before warmup runs each program once: the
run must find them built (nothing compiled twice), and serving must not care how they were built."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
from distllm_jax.engine import DeviceRandomSource, Engine, EngineConfig, InstanceSpec, SamplingParams, compile_counter
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.presets import preset
compile_counter.install()
threads, pp = int(sys.argv[1]), int(sys.argv[2])
cfg = ModelConfig.from_hf_dict(preset("tiny-opt"))
ecfg = EngineConfig(mode="colocated", colocated=(InstanceSpec(tp=1, pp=pp),), max_seq_len=32, max_decode_batch=2,
                    prefill_token_budget=32, num_pages=32, compile_threads=threads, progress=False)
engine = Engine(DeviceRandomSource(cfg, "float32", seed=0), ecfg)
built = compile_counter.compilations()
out = engine.submit([5, 6, 7, 8], SamplingParams(max_tokens=6, ignore_eos=True)).result()
print(json.dumps({"built": built, "programs": engine.instances[0].num_programs(),
                  "after": compile_counter.compilations() - built, "tokens": list(out.token_ids)}))
engine.shutdown()
"""


def _start(threads: int, pp: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(threads), str(pp)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_step_programs_built_side_by_side_are_not_built_again():
    """Two pipeline stages: each builds its own programs, so the threads share out more than one
    stage's list (one stage is the same path with a shorter list)."""
    one, side = _start(1, 2), _start(2, 2)
    assert side["built"] == one["built"]  # each program built once, on whichever thread
    assert side["after"] == one["after"] == 0
    assert side["tokens"] == one["tokens"] and len(one["tokens"]) == 6
