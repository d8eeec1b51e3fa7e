"""The Figure 11 ablation as DistServe's artifact runs it: the layouts it enumerates, its low-affinity
rule, the goodput search (bracket from the grid, bisection, pruning), and a whole run on a tiny
workload through ``distllm simulate --ablation`` that writes the PNG and JSON."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from distllm_jax.placement.ablation import (AblationSpec, Layout, Runner, grid_bracket, layouts, low_affinity, pick,
                                            refine, run, vllm_layout)
from distllm_jax.placement.latency import load_profile
from distllm_jax.instance_spec import InstanceSpec


@pytest.fixture(scope="module")
def a100():
    return load_profile("a100-opt-13b")


def test_layouts_within_four_gpus(a100):
    disagg, coloc = layouts(a100, 4)
    # one prefill + one decode instance, 1 or 2 GPUs each (tp, pp in {1, 2, 4, 8}, at most 4 in all)
    assert len(disagg) == 9 and all(l.gpus <= 4 for l in disagg)
    assert {l.name for l in coloc} == {"tp1pp1", "tp1pp2", "tp1pp4", "tp2pp1", "tp2pp2", "tp4pp1"}
    assert disagg[0].name == "P-tp1pp1/D-tp1pp1"  # the artifact's product() order
    assert vllm_layout(a100, coloc).name == "tp1pp1"
    # the profile times no tp 8: the 32-GPU search leaves it out
    assert all(l.prefill.tp != 8 and l.decode.tp != 8 for l in layouts(a100, 32)[0])


def test_low_affinity_is_the_artifacts_rule():
    lay = lambda p, d: Layout(InstanceSpec(*p), InstanceSpec(*d))  # noqa: E731
    # 4 GPUs and 8-GPU nodes: every layout has its one segment in a node
    assert low_affinity(lay((2, 1), (1, 2)), nodes=4, gpus_per_node=8)
    # 2-GPU nodes: the pipelines must split into segments of one node each, at a common degree
    assert low_affinity(lay((1, 2), (1, 2)), nodes=4, gpus_per_node=2)
    assert not low_affinity(lay((2, 1), (1, 1)), nodes=4, gpus_per_node=2)
    assert not low_affinity(lay((1, 2), (1, 1)), nodes=4, gpus_per_node=2)  # pp 1 cannot split
    assert low_affinity(lay((4, 4), (4, 4)), nodes=4, gpus_per_node=8)  # k = 4: tp4 + tp4 a node
    assert not low_affinity(lay((4, 4), (4, 4)), nodes=2, gpus_per_node=8)  # k <= 2: 16 GPUs a segment
    assert low_affinity(Layout(colocated=InstanceSpec(4, 8)), nodes=1, gpus_per_node=1)


def test_goodput_bracket_and_bisection():
    calls = []

    def attain(r: float) -> float:
        calls.append(r)
        return 1.0 if r <= 2.7 else 0.5

    assert grid_bracket(attain, (1, 2, 3, 4, 5), 0.9, 64) == (2, 3)
    assert calls == [1, 2, 3]  # stops at the first failing rate
    lo, hi = refine(attain, 2, 3, 0.9, 1 / 32)
    assert lo <= 2.7 < hi and hi - lo <= 1 / 32
    calls.clear()
    assert refine(attain, 2, 3, 0.9, 1 / 32, floor=3.5) == (2, 3) and not calls  # cannot beat 3.5
    assert grid_bracket(lambda r: 1.0, (1, 2), 0.9, 16) == (16, math.inf)  # doubling up to the cap
    assert grid_bracket(lambda r: 0.0, (1, 2), 0.9, 16) == (0.0, 1)


def test_pick_prunes_and_the_artifact_pick(a100):
    lengths = [(64, 8), (200, 16), (32, 4)]
    spec = AblationSpec(requests_per_gpu=4, per_gpu_rates=(1.0, 2.0))
    cands = layouts(a100, 4)[1]
    runner = Runner(a100, lengths, spec, {})
    brackets: dict = {}
    best = pick(runner, cands, brackets)
    assert brackets[best][0] == max(b[0] for b in brackets.values())
    art = Runner(a100, lengths, AblationSpec(requests_per_gpu=4, per_gpu_rates=(1.0, 2.0), pick="artifact"), {})
    chosen = pick(art, cands, {})
    assert art.attainment(chosen, 2.0) == max(art.attainment(c, 2.0) for c in cands)
    assert art.simulations == len(cands)  # one simulation each, at the highest rate


def test_run_follows_the_artifacts_workload(a100):
    lengths = [(100 + 7 * i, 10 + i) for i in range(12)]
    spec = AblationSpec(requests_per_gpu=3, per_gpu_rates=(1.0, 2.0), slo_scales=(0.5, 1.0))
    r = run(a100, lengths, spec, dict(transfer_gbps=100.0))
    assert list(r["systems"]) == ["DistServe-High", "DistServe-Low", "vLLM++", "vLLM"]
    s = r["systems"]
    assert s["vLLM"]["layout"] == "tp1pp1" and s["vLLM"]["mode"] == "colocated"
    assert s["DistServe-High"]["mode"] == "disaggregated" and s["DistServe-High"]["candidates"] == 9
    assert s["DistServe-Low"]["candidates"] == 9  # every 4-GPU layout fits one 8-GPU node
    for v in s.values():
        lo, hi = v["per_gpu_goodput_bracket"]
        assert v["per_gpu_goodput"] == lo and (hi - lo <= spec.rate_tol or math.isinf(hi))
        assert set(v["attainment_by_per_gpu_rate"]) == {1.0, 2.0} and set(v["attainment_by_slo_scale"]) == {0.5, 1.0}
        assert v["grid_per_gpu_goodput"] in (0.0, 1.0, 2.0)
    # a layout of g GPUs gets 3·g requests at g × the per-GPU rate: attainment in steps of 1/(3·g)
    layout = r["layouts"][s["DistServe-High"]["layout"]]
    g = layout["gpus"]
    assert all(abs(a * 3 * g / 100 - round(a * 3 * g / 100)) < 1e-9 for a in layout["attainment_by_per_gpu_rate"].values())


def test_cli_ablation_writes_png_and_json(tmp_path, capsys):
    from distllm_jax.cli import main

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"prompt": "word " * (5 + 3 * i), "output_len": 4 + i}) + "\n" for i in range(8)))
    out = tmp_path / "fig"
    assert main(["simulate", "--ablation", "--dataset", f"file:{data}", "--requests-per-gpu", "2",
                 "--out-dir", str(out)]) == 0
    d = json.loads((out / "figure11.json").read_text())
    assert set(d["systems"]) == {"DistServe-High", "DistServe-Low", "vLLM++", "vLLM"}
    assert all(v["per_gpu_goodput"] >= 0 for v in d["systems"].values())
    assert d["spec"]["total_gpus"] == 4 and d["spec"]["per_gpu_rates"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert d["dataset"] == f"file:{data}" and (out / "figure11.png").stat().st_size > 0
    assert "DistServe-High" in capsys.readouterr().out


def test_default_dataset_is_the_artifacts(monkeypatch):
    from distllm_jax.placement import ablation, cli

    seen = {}

    def fake(args) -> int:
        seen["dataset"] = args.dataset
        return 0

    monkeypatch.setattr(ablation, "run_ablation", fake)
    p = argparse.ArgumentParser()
    cli.add_commands(p.add_subparsers())
    args = p.parse_args(["simulate", "--ablation"])
    assert args.gpus == 4 and args.pick == "goodput" and args.requests_per_gpu == 100
    cli.cmd_simulate(args)
    assert seen["dataset"] == "sharegpt-artifact"
    assert Path(args.out_dir) == Path("bench/results/figure11")
