"""The conversations-vs-simulator report: hit rate as cached over prompt tokens, goodput as the
highest start rate at 90 % attainment per cache setting and side, and a table with one row a run."""

from __future__ import annotations

from bench.conversations_vs_sim import goodput, hit_rate, table


def run(cache: str, rate: float, eng: float, sim: float) -> dict:
    return {"prefix_cache": cache, "rate": rate, "engine_hit_rate": 0.5 if cache == "on" else 0.0,
            "sim_hit_rate": 0.25 if cache == "on" else 0.0, "engine_p50_ttft": 0.05, "sim_p50_ttft": 0.04,
            "engine_p50_tpot": 0.02, "sim_p50_tpot": 0.021, "engine_attainment": eng, "sim_attainment": sim,
            "attainment_diff_points": 100 * (sim - eng)}


def test_hit_rate_weighs_requests_by_their_prompt_tokens():
    assert hit_rate([(0, 100), (90, 100), (0, 0)]) == 0.45
    assert hit_rate([(3, 4)]) == 0.75
    assert hit_rate([]) == 0.0


def test_goodput_is_the_highest_rate_at_ninety_percent_per_setting_and_side():
    runs = [run("off", 1, 1.0, 1.0), run("off", 2, 0.95, 0.85), run("off", 4, 0.5, 0.6),
            run("on", 1, 1.0, 1.0), run("on", 2, 0.99, 0.97), run("on", 4, 0.9, 0.89)]
    assert goodput(runs) == {"off": {"engine": 2, "sim": 1}, "on": {"engine": 4, "sim": 2}}
    assert goodput([run("on", 3, 0.2, 0.1)]) == {"on": {"engine": 0.0, "sim": 0.0}}


def test_table_has_a_header_and_one_row_a_run():
    lines = table([run("off", 2, 0.95, 0.85), run("on", 2, 0.99, 0.97)]).splitlines()
    assert len(lines) == 3 and lines[0].split()[:2] == ["cache", "rate"]
    off, on = (line.split() for line in lines[1:])
    assert off[:4] == ["off", "2", "0%", "0%"] and on[:4] == ["on", "2", "50%", "25%"]
    assert off[-1] == "-10" and on[-1] == "-2"


def test_routing_summary_and_table():
    from types import SimpleNamespace

    from bench.prefix_routing import summarize
    from bench.prefix_routing import table as routing_table

    recs = [SimpleNamespace(server={"ttft": t, "tpot": p, "cached_prompt_tokens": c}, prompt_len=n)
            for t, p, c, n in ((0.1, 0.01, 0, 40), (0.3, 0.01, 32, 40), (0.2, None, 16, 20))]
    s = summarize(recs, (0.25, 0.05))
    assert s["turns"] == 3 and s["hit_rate"] == 0.48 and s["p50_ttft"] == 0.2 and s["p90_ttft"] == 0.3
    assert s["p50_tpot"] == 0.01 and abs(s["attainment"] - 2 / 3) < 1e-12  # a one-token reply has no TPOT
    lines = routing_table([{"routing": "prefix", **s, "cache_routed_share": 0.5},
                           {"routing": "shared", **s, "cache_routed_share": None}]).splitlines()
    assert lines[1].split()[:4] == ["prefix", "3", "48%", "50%"] and lines[2].split()[3] == "-"
