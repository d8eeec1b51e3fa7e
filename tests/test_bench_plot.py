"""The bench's plot and kick-the-tires' closing report: axes that match the table, points that do not
hide each other, and the SLO the attainment counts against."""

from __future__ import annotations

import json
from pathlib import Path

from bench.kick_the_tires import print_results
from bench.metrics import RequestRecord, summarize
from bench.plot import dodge, plot
from distllm_jax.workload.slo import SLO

SLO_ = SLO(0.25, 0.1)


def _run_file(folder: Path, mode: str, rate: float, devices: int, ttft: float) -> dict:
    recs = [RequestRecord(i, arrival=i / rate, prompt_len=8, output_len=4, sent=i / rate,
                          first_token=i / rate + ttft, finish=i / rate + ttft + 0.15, output_tokens=4,
                          token_times=[i / rate + ttft + 0.05 * k for k in range(4)])
            for i in range(4)]
    run = {"config": {"mode": mode, "rate": rate, "devices": devices, "model": "m", "num_prompts": 4},
           "summary": summarize(recs, SLO_), "requests": [r.to_dict() for r in recs]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{mode}-4-{rate:g}.json").write_text(json.dumps(run))
    return run


def test_dodge_spreads_only_coinciding_points():
    series = {"chunked": ([2.0, 4.0], [100.0, 50.0]), "colocated": ([2.0, 4.0], [100.0, 80.0]),
              "disaggregated": ([2.0, 4.0], [99.5, 20.0])}
    xs = dodge(series)
    at2 = [xs[m][0] for m in sorted(xs)]
    assert len(set(at2)) == 3 and sorted(at2) == at2, "three coinciding points, three positions, name order"
    assert abs(sum(at2) / 3 - 2.0) < 1e-9, "spread around the true rate"
    assert [xs[m][1] for m in sorted(xs)] == [4.0, 4.0, 4.0], "points apart from the others stay put"
    assert dodge({"a": ([1.0], [50.0])}) == {"a": [1.0]}


def test_kick_the_tires_plot_uses_the_tables_rates(tmp_path):
    d = tmp_path / "m-sharegpt"
    _run_file(d, "disaggregated", 2.0, devices=2, ttft=0.1)
    _run_file(d, "colocated", 2.0, devices=1, ttft=0.1)
    table = plot([d], SLO_, tmp_path / "kick.png", per_gpu=False)
    assert table["disaggregated"]["rate"] == [2.0] and table["disaggregated"]["scale_at"] == 2.0
    assert table["disaggregated"]["per_gpu_rate"] == [1.0]
    assert (tmp_path / "kick.png").stat().st_size > 0
    assert plot([d], SLO_, tmp_path / "fig.png")["disaggregated"]["scale_at"] == 1.0  # Figure 8's axis


def test_closing_table_names_the_slo(tmp_path, capsys):
    runs = [_run_file(tmp_path, "colocated", 2.0, devices=1, ttft=0.1)]
    print_results(runs, SLO_, "opt-13b-sharegpt")
    out = capsys.readouterr().out
    assert "attain" in out.splitlines()[0]
    assert "TTFT <= 0.25 s and TPOT <= 0.1 s (--slo opt-13b-sharegpt)" in out
