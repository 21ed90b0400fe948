"""bench/results/README.md indexes every result file, and names no file that is not there."""

from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def test_every_result_file_is_in_the_index():
    index = (RESULTS / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+)`(?: \(([^)]*)\))? \|", index, re.M)
    listed = {stem + ext for stem, exts in rows for ext in (exts.split() if exts else [""])}
    present = {p.name for p in RESULTS.iterdir() if p.name != "README.md"}
    assert sorted(present - listed) == []  # a new result needs its row
    assert sorted(listed - present) == []  # a row for a file that is gone
