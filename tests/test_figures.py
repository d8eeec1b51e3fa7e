"""Figures 8 and 9 in simulation: the ratios and their nulls, the extrapolated 175B profiles, the
placement search's pruning, one entry end to end on a toy profile (the JSON keys), and the CLI
writing the PNG and JSON on a tiny workload."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from distllm_jax.placement.ablation import AblationSpec, Layout
from distllm_jax.placement.figures import (FIGURES, RATIO_KEYS, Entry, best_unit, bracket_around, profiles_for,
                                           rate_ratio, ratios, run_entry, scaled_fit, slo_ratio, table)
from distllm_jax.placement.latency import Fit, Profile
from distllm_jax.placement.search import Cluster
from distllm_jax.instance_spec import InstanceSpec


def toy_profile(model: str = "toy", slower: float = 1.0) -> Profile:
    """Two tensor degrees, 4 layers, room for any layout; ``slower`` scales every step."""
    fit = lambda k: Fit((k * 2.0, k * 0.02, 0.0), (k * 2.0, k * 0.001, k * 0.1), (k * 2.0, k * 0.001, k * 0.1))  # noqa: E731
    return Profile(model, "toy", {1: fit(slower), 2: fit(0.6 * slower)}, params_bytes=1e9, kv_bytes_per_token=1e5,
                   gpu_memory_bytes=8e9, num_layers=4)


def test_ratios_and_nulls():
    assert rate_ratio(2.0, 0.5) == 4.0
    assert rate_ratio(2.0, 0.0) is None  # the baseline never reaches 90 %: no finite ratio
    assert rate_ratio(2.0, None) is None  # not run
    assert slo_ratio(0.5, 1.5) == 3.0
    assert slo_ratio(math.inf, 1.0) is None and slo_ratio(0.5, math.inf) is None and slo_ratio(0.5, None) is None
    systems = {"DistServe": {"per_gpu_goodput": 3.0}, "vLLM": {"per_gpu_goodput": 1.0}}
    r = ratios(systems, {"vLLM": (0.25, 1.0)})
    assert r == {"rate_ratio_vs_vllm": 3.0, "slo_ratio_vs_vllm": 4.0, "rate_ratio_vs_mii": None,
                 "slo_ratio_vs_mii": None}
    assert set(r) == set(RATIO_KEYS)


def test_scaled_fit_is_term_by_term():
    base = Fit((10.0, 1.0, 0.0), (4.0, 2.0, 1.0), (4.0, 2.0, 1.0), overhead=(2.0, 0.0001))
    num = Fit((2.0, 3.0, 5.0), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), prefill_hop_ms=7.0)
    den = Fit((1.0, 1.0, 0.0), (2.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    s = scaled_fit(base, num, den)
    assert s.prefill == (20.0, 3.0, 0.0)  # a zero in den keeps base's term
    assert s.decode_small == (2.0, 2.0, 1.0)
    assert s.overhead == (2.0, 0.0001) and s.prefill_hop_ms == 0.0  # base's, not num's
    with pytest.raises(ValueError, match="negative"):
        scaled_fit(base, dataclasses.replace(num, prefill=(-1.0, 1.0, 1.0)), den)


def test_175b_profiles_are_extrapolated_and_said_so():
    ds, vl, notes = profiles_for("opt-175b")
    assert sorted(ds.fits) == [2, 3, 4, 8] and sorted(vl.fits) == [8]
    assert ds.source.startswith("EXTRAPOLATED") and vl.source.startswith("EXTRAPOLATED") and len(notes) == 2
    assert all(x > 0 for f in ds.fits.values() for x in f.prefill[:2])
    assert ds.fit(2).prefill[0] > ds.fit(8).prefill[0]  # fewer GPUs, slower, as at 66B
    assert profiles_for("opt-66b")[2] == []


class FakeRunner:
    """A runner whose layouts have known goodputs: attainment 1 up to it, 0 above."""

    def __init__(self, goodputs: dict[Layout, float]):
        self.spec = AblationSpec(rate_tol=0.0, rate_rel_tol=0.01, max_per_gpu_rate=64.0)
        self.goodputs, self.calls = goodputs, []

    def attainment(self, layout: Layout, rate: float, scale: float = 1.0) -> float:
        self.calls.append((layout, rate))
        return 1.0 if rate <= self.goodputs[layout] else 0.0


def test_best_unit_prunes_at_the_best_so_far():
    one, two = InstanceSpec(1), InstanceSpec(2)
    a, b, c = Layout(one, one), Layout(two, one), Layout(two, two)
    runner = FakeRunner({a: 1.0, b: 0.5, c: 3.0})
    brackets: dict = {}
    best, tried = best_unit(runner, [c, b, a], 1.0, brackets)
    assert best == c and 3.0 * 0.99 <= brackets[c][0] <= 3.0
    assert sum(1 for l, _ in runner.calls if l == b) == 1  # b misses at a's goodput: one simulation
    assert "attainment_at_best_pct" in tried[b.name] and "per_gpu_goodput_bracket" in tried[c.name]
    assert bracket_around(lambda r: float(r <= 0.3), 1.0, 0.9, 64, 1 / 64) == (0.25, 0.5)
    assert bracket_around(lambda r: 0.0, 1.0, 0.9, 64, 0.2) == (0.0, 0.25)


def test_entry_end_to_end_on_a_toy_profile():
    entry = Entry("toy", "chatbot", "file:x", "0.5,0.1", 1, False, {**FIGURES[8][2].paper})
    lengths = [(40 + 13 * i, 4 + i) for i in range(10)]
    e = run_entry(entry, lengths, requests=12, span_ttft=0.0, cluster=Cluster(1, 4), profiles=(toy_profile(), toy_profile(slower=1.3)))
    assert set(RATIO_KEYS) <= set(e) and e["rate_ratio_vs_mii"] is None and e["slo_ratio_vs_mii"] is None
    assert set(e["systems"]) == {"DistServe", "vLLM"}  # no MII run where the paper had none
    assert e["placement"]["algorithm"] == "algorithm2-low-affinity" and e["placement"]["gpus"] <= 4
    ds = e["systems"]["DistServe"]
    assert ds["mode"] == "disaggregated" and e["systems"]["vLLM"]["layout"] == "tp1pp1"
    if e["rate_ratio_vs_vllm"] is not None:
        assert e["rate_ratio_vs_vllm"] == pytest.approx(ds["per_gpu_goodput"] / e["systems"]["vLLM"]["per_gpu_goodput"])
    json.dumps(e, allow_nan=False)  # strict JSON: no inf or NaN
    assert "toy-chatbot" in table([e])


def test_the_papers_claims_and_runs():
    chat, code, summ = FIGURES[8], *FIGURES[9]
    assert [e.vllm_tp for e in chat] == [1, 4, 8] and [e.mii for e in chat] == [True, True, False]
    assert chat[2].paper["rate_ratio_vs_mii"] is None and chat[0].paper["rate_ratio_vs_vllm"] == [2.0, 4.6]
    assert (code.paper["rate_ratio_vs_vllm"], summ.paper["slo_ratio_vs_vllm"]) == (5.7, 12.6)
    assert (code.dataset, summ.dataset) == ("humaneval", "longbench")


def test_cli_figure_writes_png_and_json(tmp_path, capsys, monkeypatch):
    from distllm_jax.cli import main
    from distllm_jax.placement import figures

    monkeypatch.setitem(figures.FIGURES, 9, figures.FIGURES[9][:1])  # one entry keeps it quick

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"prompt": "word " * (5 + 3 * i), "output_len": 3 + i}) + "\n" for i in range(6)))
    out = tmp_path / "fig"
    assert main(["simulate", "--figure", "9", "--dataset", f"file:{data}", "--figure-requests", "5", "--figure-span-ttft", "0",
                 "--out-dir", str(out)]) == 0
    d = json.loads((out / "figure9.json").read_text())
    assert d["figure"] == 9 and [e["name"] for e in d["entries"]] == ["opt-66b-code"]
    for e in d["entries"]:
        assert set(RATIO_KEYS) <= set(e) and set(e["systems"]) == {"DistServe", "vLLM", "DeepSpeed-MII"}
        assert e["systems"]["vLLM"]["layout"] == "tp4pp1" and e["systems"]["DeepSpeed-MII"]["mode"] == "chunked"
        assert e["paper"]["rate_ratio_vs_vllm"] == 5.7 and e["dataset"] == f"file:{data}"
    assert (out / "figure9.png").stat().st_size > 0
    assert "opt-66b-code" in capsys.readouterr().out
