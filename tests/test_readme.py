"""The README stands alone: its links stay inside the repository, its tables are whole, and its Python
snippets are valid and bounded."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_stay_inside_the_repository():
    anchors = {_slug(h) for h in re.findall(r"^#+ (.*)$", README, re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    assert links, "the README links somewhere"
    for target in links:
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"no heading for {target}"
            continue
        path = (ROOT / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{target} is not a file of the repository"
    assert "../" not in README


def test_table_rows_are_whole():
    tables = [t.splitlines() for t in re.findall(r"^(?:\|.*\n?)+", README, re.M)]  # runs of "|" lines
    assert tables
    cells = lambda row: len(re.findall(r"(?<!\\)\|", row))  # noqa: E731
    for rows in tables:
        for row in rows:
            assert row.rstrip().endswith("|"), f"row not closed: {row[:80]}..."
            assert cells(row) == cells(rows[0]), f"row with another cell count than its header: {row[:80]}..."
            assert len(row) < 1000, f"a paragraph in a table cell: {row[:80]}..."


def test_python_snippets_compile_and_the_openai_one_is_bounded():
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README, re.S)]
    for b in blocks:
        compile(b, "README.md", "exec")
    openai = [b for b in blocks if "OpenAI(" in b]
    assert openai and all("max_tokens=" in b for b in openai)


def test_says_that_transformers_checkpoints_need_torch():
    assert re.search(r"`transformers`[^.]*needs\s+`torch`", README)
