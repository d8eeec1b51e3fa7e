"""Trace files (JSON Lines and DistServe's .exp), their summaries, their replay through the simulator
(``distllm simulate --trace``), the named system presets and vLLM's shipped A100 profiles."""

from __future__ import annotations

import json

import pytest

from distllm_jax.cli import main
from distllm_jax.placement.latency import PROFILES, Fit, Profile, load_profile
from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.simulator import SimConfig
from distllm_jax.placement.systems import SYSTEMS, system_config
from distllm_jax.placement.trace import TraceError, compare, read_trace, replay, summarize

GB = 1e9


def toy_profile() -> Profile:
    return Profile("toy", "toy", {1: Fit((10.0, 0, 0), (5.0, 0, 0), (5.0, 0, 0))}, params_bytes=1 * GB,
                   kv_bytes_per_token=1e6, gpu_memory_bytes=80 * GB, num_layers=8)


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


ROWS = [{"arrival_s": 1.0, "prompt_len": 8, "output_len": 4, "ttft_s": 0.05, "tpot_s": 0.02},
        {"arrival_s": 0.0, "prompt_len": 16, "output_len": 2, "ttft_s": 0.3, "tpot_s": 0.01},
        {"arrival_s": 2.0, "prompt_len": 4, "output_len": 1, "ttft_s": 0.1, "tpot_s": 0.0}]


def test_jsonl_is_read_sorted_by_arrival(tmp_path):
    t = read_trace(write_jsonl(tmp_path / "t.jsonl", ROWS))
    assert [r.arrival_s for r in t.requests] == [0.0, 1.0, 2.0]
    assert t.requests[0].prompt_len == 16 and t.requests[0].ttft_s == 0.3 and t.measured and t.name == "t"
    bare = read_trace(write_jsonl(tmp_path / "bare.jsonl", [{k: r[k] for k in ("arrival_s", "prompt_len", "output_len")}
                                                             for r in ROWS]))
    assert not bare.measured and bare.requests[1].ttft_s is None


def test_exp_is_read_like_distserve(tmp_path):
    recs = [{"prompt_len": 55, "output_len": 4, "issue_time": 1000.5, "first_token_time": 1000.6,
             "ttft_ms": 69.5, "tpot_ms": 26.1, "latency_ms": 148.0},
            {"prompt_len": 9, "output_len": 3, "issue_time": 1000.0, "ttft_ms": 20.0, "tpot_ms": 10.0}]
    p = tmp_path / "vllm-2-1.exp"
    p.write_text(repr(recs) + "\n[ignored second line]\n")
    t = read_trace(p)
    assert [r.arrival_s for r in t.requests] == [0.0, 0.5]  # relative to the first issue time, sorted
    assert t.requests[1].prompt_len == 55 and t.requests[1].ttft_s == pytest.approx(0.0695)
    assert t.requests[1].tpot_s == pytest.approx(0.0261) and t.measured
    q = tmp_path / "other-name"  # sniffed by its first character
    q.write_text(repr(recs))
    assert read_trace(q).requests == t.requests


@pytest.mark.parametrize("text, where, msg", [
    ('{"arrival_s": 0, "prompt_len": 3, "output_len": 2}\n{"arrival_s": 1, "prompt_len": 3}\n', ":2", "'output_len'"),
    ('{"arrival_s": 0, "prompt_len": 3, "output_len": 2}\nnot json\n', ":2", "not JSON"),
    ('{"arrival_s": 0, "prompt_len": 2.5, "output_len": 2}\n', ":1", "whole number"),
    ('{"arrival_s": 0, "prompt_len": 0, "output_len": 2}\n', ":1", ">= 1"),
    ('{"arrival_s": -1, "prompt_len": 3, "output_len": 2}\n', ":1", ">= 0"),
    ('{"arrival_s": "x", "prompt_len": 3, "output_len": 2}\n', ":1", "a number"),
    ('[1, 2]\n', ":1: request 0", "expected an object"),
    ('[{"prompt_len": 1, "output_len": 1}]\n', ":1: request 0", "'issue_time'"),
    ("[{'prompt_len': __import__('os')}]\n", ":1", "not a Python literal"),
    ('{"arrival_s": 0, "prompt_len": 3, "output_len": 2, "ttft_s": 0.1, "tpot_s": 0.1}\n'
     '{"arrival_s": 1, "prompt_len": 3, "output_len": 2}\n', ":2", "measured throughout"),
    ("\n", "", "no requests"),
])
def test_bad_traces_name_the_file_and_line(tmp_path, text, where, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(TraceError) as e:
        read_trace(p)
    assert f"{p}{where}" in str(e.value) and msg in str(e.value)
    with pytest.raises(TraceError, match="no such trace"):
        read_trace(tmp_path / "missing.jsonl")


def test_summary_is_strict_at_the_targets():
    s = summarize([0.1, 0.2, 0.3, 0.05], [0.05, 0.05, 0.05, 0.1], (0.2, 0.1))
    assert s["attainment_pct"] == 25.0  # 0.2 s TTFT and 0.1 s TPOT are not below their targets
    assert s["ttft_p50_s"] == pytest.approx(0.15) and s["tpot_p90_s"] == pytest.approx(0.085)
    with pytest.raises(ValueError):
        summarize([], [], (1, 1))


def test_replay_and_compare(tmp_path):
    t = read_trace(write_jsonl(tmp_path / "t.jsonl", ROWS))
    sim = replay(t, toy_profile(), SimConfig("colocated", transfer_gbps=0))
    assert [r.prompt_len for r in sim] == [16, 8, 4]
    assert sim[0].ttft == pytest.approx(0.010) and sim[1].tpot == pytest.approx(0.005)  # alone, by hand
    res = compare(t, toy_profile(), SimConfig("colocated"), (0.2, 0.1))
    assert res["requests"] == 3 and res["slo"] == [0.2, 0.1]
    assert res["sim"]["attainment_pct"] == 100.0
    assert res["trace"]["attainment_pct"] == pytest.approx(200 / 3)  # the 0.3 s TTFT misses
    bare = read_trace(write_jsonl(tmp_path / "b.jsonl", [{k: r[k] for k in ("arrival_s", "prompt_len", "output_len")}
                                                         for r in ROWS]))
    assert compare(bare, toy_profile(), SimConfig("colocated"), (0.2, 0.1))["trace"] is None


def test_system_presets():
    v = system_config("vllm", colocated=(InstanceSpec(1, 1),))
    assert v.mode == "colocated" and (v.prefill_token_budget, v.max_prefill_seqs, v.max_decode_batch) == (16384, 1024, 1024)
    d = system_config("vllm-defaults")
    assert (d.prefill_token_budget, d.max_decode_batch) == (2048, 256)
    ds = system_config("distserve", prefill=(InstanceSpec(2, 1),), decode=(InstanceSpec(1, 1),))
    assert ds.mode == "disaggregated" and ds.prefill == (InstanceSpec(2, 1),) and ds.gpus == 3
    assert (ds.prefill_token_budget, ds.max_prefill_seqs, ds.max_decode_batch) == (8192, 128, 1024)
    assert system_config("distllm", "chunked") == SimConfig("chunked")
    assert system_config("distserve", max_decode_batch=8).max_decode_batch == 8  # explicit settings win
    with pytest.raises(ValueError, match="runs colocated"):
        system_config("vllm", "disaggregated")
    with pytest.raises(ValueError, match="unknown system"):
        system_config("sglang")
    with pytest.raises(ValueError, match="not SimConfig fields"):
        system_config("vllm", preempt_by_recompute=True)
    for cls in SYSTEMS.values():
        assert "Source" in (cls.__doc__ or "") or cls.name == "distllm"


def test_vllm_profiles_carry_distserve_numbers():
    """vLLM's fitted A100 model with the camera-ready simulator's factors (prefill x1.4 + 1 ms x pp,
    decode x1.2), and the KV capacity DistServe's memory profiler measured at 0.95 utilisation."""
    p13, base = load_profile("a100-opt-13b-vllm"), load_profile("a100-opt-13b")
    assert sorted(p13.fits) == [1, 2, 4] and sorted(load_profile("a100-opt-66b-vllm").fits) == [2, 3, 4, 8]
    f = p13.fit(1)
    assert f.prefill == pytest.approx(tuple(1.4 * x for x in (15.751574849507277, 0.10036374192949256, 5.76898915900792e-06)))
    assert f.decode_large == pytest.approx(tuple(1.2 * x for x in (16.8386301447433, 0.00040897725301957885, 0.10000261546561776)))
    assert f.overhead == (2.0, 0.0001) and f.threshold == 95 and f.prefill_hop_ms == 1.0
    assert (p13.params_bytes, p13.kv_bytes_per_token) == (base.params_bytes, base.kv_bytes_per_token)
    assert p13.kv_token_capacity(1, 1, 0.95) == base.kv_token_capacity(1, 1, 0.95) == 66144
    assert base.kv_token_capacity(1, 1) == 56518  # other utilisations: from the weights
    p66, b66 = load_profile("a100-opt-66b-vllm"), load_profile("a100-opt-66b")
    assert (p66.params_bytes, p66.kv_bytes_per_token, p66.num_layers) == (b66.params_bytes, b66.kv_bytes_per_token, 64)
    raw = json.loads((PROFILES / "a100-opt-66b-vllm.json").read_text())
    for tp, fit in raw["fits"].items():  # every number traced back to the file it came from
        src = raw["source_coefficients"]["fits"][tp]
        assert fit["prefill"] == pytest.approx([1.4 * x for x in src["prefill"]])
        assert fit["decode_small"] == pytest.approx([1.2 * x for x in src["decoding_smallbs"]])
        assert fit["decode_large"] == pytest.approx([1.2 * x for x in src["decoding_largebs"]])
    assert "profiler-a100-80g.vllm.json" in p13.source and "1.4" in p13.source and "camera-ready" in p13.source


def test_cli_simulate_trace_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "vllm-3-1.jsonl", ROWS)
    assert main(["simulate", "--trace", path, "--system", "vllm", "--profile", "a100-opt-13b-vllm", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["requests"] == 3 and res["slo"] == [0.2, 0.1]  # the paper's opt-13b-sharegpt ablation SLO
    assert set(res["sim"]) == {"attainment_pct", "ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s"}
    assert res["trace"]["attainment_pct"] == pytest.approx(200 / 3)
    assert "vllm (colocated 1x tp1pp1)" in out[0]
    assert main(["simulate", "--trace", path, "--system", "distserve", "--prefill", "tp2p1", "--decode", "tp1p1",
                 "--slo", "1,1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["slo"] == [1.0, 1.0] and res["sim"]["attainment_pct"] == 100.0
    assert main(["simulate", "--trace", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such trace file" in capsys.readouterr().err


def test_trace_items_have_the_trace_lengths(tmp_path):
    from bench.runs import trace_items

    t = read_trace(write_jsonl(tmp_path / "t.jsonl", ROWS))
    items = trace_items(t, lambda s: list(range(len(s.split()))), 64)
    assert [(i.prompt_len, i.output_len) for i in items] == [(16, 2), (8, 4), (4, 1)]
    assert items[0].prompt_ids[:3] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"request 0 \(arrival 0 s\) needs 16 \+ 2 tokens, over the server's context of 10"):
        trace_items(t, lambda s: [1], 10)
