"""The README's GPU performance table is the one rendered from the committed floor report."""

from __future__ import annotations

import json

import pytest

from bench import readme_table


def test_the_readme_table_is_rendered_from_the_report():
    assert readme_table.README.read_text() == readme_table.expected_readme(), (
        "README.md's performance table is stale: run python3 -m bench.readme_table --write")
    assert readme_table.main(["--check"]) == 0


def test_a_changed_report_changes_the_table(tmp_path):
    report = json.loads(readme_table.REPORT.read_text())
    before = readme_table.render(report, "x.json")
    report["decode"][0]["step_ms"] *= 2
    after = readme_table.render(report, "x.json")
    assert before != after
    r = report["decode"][0]
    assert f"| {r['step_ms']:.2f} | {r['read_floor_ms']:.2f} | {r['step_ms'] / r['read_floor_ms']:.2f} |" in after


def test_the_markers_must_be_there_once():
    with pytest.raises(ValueError, match="markers"):
        readme_table.splice("no markers here", "table")
    text = readme_table.splice(f"a\n{readme_table.BEGIN}\nold\n{readme_table.END}\nb", "new")
    assert text == f"a\n{readme_table.BEGIN}\nnew\n{readme_table.END}\nb"
