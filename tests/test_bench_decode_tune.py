"""The decode kernel's sweep: every config it keeps was checked and timed, and the kernel reads the
table it writes."""

from __future__ import annotations

import jax.numpy as jnp

from bench.decode_tune import first_round, tune_shape
from pallas_kernels.decode_tuning import DecodeConfig, choose


def test_first_round_covers_heads_a_program_only_for_grouped_queries():
    assert {c.heads_per_program for c in first_round(40, 40)} == {1}
    assert {c.heads_per_program for c in first_round(32, 8)} == {1, 2, 4}
    assert {c.prefetch for c in first_round(32, 8)} == {False, True}


def test_the_sweep_keeps_a_timed_config_that_the_lookup_returns():
    first = [DecodeConfig(2, None, 1, 4, 1, False), DecodeConfig(1, None, 2, 4, 1, True)]
    e = tune_shape(2, 64, 4, 2, 16, dtype=jnp.float32, interpret=True, reps=1, first=first, splits=(1,))
    best = DecodeConfig(**e["config"])
    assert best.name in e["all_ms"] and e["ms"] == min(e["all_ms"].values())
    assert best.splits is not None  # spelled out, never left to the table
    assert e["default_ms"] > 0 and not e["failed"]
    entry = {**e, "device_kind": "interpret"}
    assert choose([entry], "interpret", 4, 2, 16, 2, 64) == best
