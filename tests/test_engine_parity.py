"""The engine's greedy outputs equal Hugging Face's, for a mixed workload arriving at random times, in
every layout: disaggregated with several tensor/pipeline degrees and instance counts, and the
colocated and chunked baselines. Every migrated page is checked bit for bit on the way
(``check_transfers``), and every page is free again afterwards."""

from __future__ import annotations

import pytest

from distllm_jax.engine import Engine, FinishReason, InstanceSpec
from engine_workload import greedy, hf_greedy, run_arrivals, small_config, workload
from hf_models import NEW_FAMILIES

WORK = workload(32)

LAYOUTS = {
    "P-tp1/D-tp2": dict(prefill=(InstanceSpec(1),), decode=(InstanceSpec(2),)),
    "P-tp2/D-tp4": dict(prefill=(InstanceSpec(2),), decode=(InstanceSpec(4),)),
    "P-pp2/D-tp2": dict(prefill=(InstanceSpec(1, pp=2),), decode=(InstanceSpec(2),)),
    "2P+1D": dict(prefill=(InstanceSpec(1), InstanceSpec(1)), decode=(InstanceSpec(2),)),
    "P-tp2/D-pp2 via transfer server": dict(prefill=(InstanceSpec(2),), decode=(InstanceSpec(1, pp=2),),
                                           kv_transfer="transfer-server"),
    "colocated": dict(mode="colocated", colocated=(InstanceSpec(2),)),
    "Pallas kernels, P-tp1/D-tp2": dict(prefill=(InstanceSpec(1),), decode=(InstanceSpec(2),), attention="pallas"),
    "chunked": dict(mode="chunked", colocated=(InstanceSpec(2),), prefill_token_budget=32),
    "Pallas kernels, chunked": dict(mode="chunked", colocated=(InstanceSpec(1),), prefill_token_budget=32,
                                    attention="pallas"),
}


@pytest.fixture(scope="module")
def reference(converted):
    cache = {}

    def get(variant):
        if variant not in cache:
            model, ckpt = converted(variant)
            cache[variant] = (ckpt, [hf_greedy(model, p, n) for p, n in WORK])
        return cache[variant]

    return get


# Each layout on the family its mechanism stresses: both families where the KV heads are split
# (decode tp 4; LLaMA's 2 KV heads are then replicated) or the Pallas kernels read them; MHA for the
# pipeline, instance-count and chunked layouts; GQA for the colocated and transfer-server paths.
# Qwen2, Qwen3 and Mistral (all GQA) run P-tp1/D-tp2 below.
CASES = [(layout, "opt-pre-ln") for layout in ("P-tp1/D-tp2", "P-pp2/D-tp2", "2P+1D", "chunked",
                                                "Pallas kernels, chunked")]
CASES += [(layout, "llama-gqa-llama3") for layout in ("P-tp2/D-pp2 via transfer server", "colocated")]
CASES += [(layout, v) for layout in ("P-tp2/D-tp4", "Pallas kernels, P-tp1/D-tp2")
          for v in ("opt-pre-ln", "llama-gqa-llama3")]


def test_every_layout_runs():
    assert {layout for layout, _ in CASES} == set(LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout,variant", CASES)
def test_greedy_matches_hf(reference, variant, layout):
    ckpt, expected = reference(variant)
    with Engine(ckpt, small_config(**LAYOUTS[layout])) as engine:
        outs = run_arrivals(engine, WORK, lambda i, n: greedy(n))
        assert engine.wait_idle(10)
        engine.assert_no_leaks()
        stats = engine.stats()
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert out.error is None, out.error
        assert out.finished is FinishReason.LENGTH
        assert out.token_ids == exp, f"{layout} {variant}: request {i} diverged"
    assert stats["finished"] == {"length": len(WORK)}
    assert stats["attention"] == ("pallas-interpret" if "Pallas" in layout else "reference")
    if LAYOUTS[layout].get("mode", "disaggregated") == "disaggregated":
        assert stats["migration_path"] == LAYOUTS[layout].get("kv_transfer", "local")
        # at most once more after a recompute preemption (not when its prefill samples its last token)
        again = sum(i["preemptions"]["recompute"] for i in stats["instances"])
        once = sum(1 for _, n in WORK if n > 1)
        assert once <= stats["migrations"] <= once + again
        used = {o.timings.prefill_instance for o in outs}
        assert len(used) == (2 if layout == "2P+1D" else 1), used


# Qwen2, Qwen3 and Mistral through convert -> engine -> generate, disaggregated with prefill on one
# device and decode on two: 32 greedy tokens each, for prompts of different lengths.
FAMILY_WORK = [([5, 9, 23, 7, 1, 100, 42, 17, 250, 3, 66], 32), ([3, 4], 32), ([77, 12, 15, 19, 21, 2, 8, 9], 32)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", NEW_FAMILIES)
def test_new_families_disaggregated_greedy_matches_hf(converted, variant):
    model, ckpt = converted(variant)
    # the fewest programs this work needs: one prefill token bucket, decode batches up to 4
    lean = dict(prefill_token_budget=32, max_prefill_seqs=4, max_decode_batch=4, max_seq_len=48)
    with Engine(ckpt, small_config(**LAYOUTS["P-tp1/D-tp2"], **lean)) as engine:
        outs = run_arrivals(engine, FAMILY_WORK, lambda i, n: greedy(n))
        assert engine.wait_idle(10)
        engine.assert_no_leaks()
        assert engine.stats()["migrations"] == len(FAMILY_WORK)
    for (prompt, n), out in zip(FAMILY_WORK, outs):
        assert out.error is None, out.error
        assert out.token_ids == hf_greedy(model, prompt, n), f"{variant}: prompt {prompt[:4]}... diverged"
