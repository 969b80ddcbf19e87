"""docs/bug_classes.md stays honest: one row per BUGS.md class, each naming the planted test(s)
that prove its check fails, and every named test exists (like the check index of
tests/test_every_check_can_fail.py)."""

from __future__ import annotations

import re
from pathlib import Path

from helpers import missing_proof

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "bug_classes.md"
CLASSES = 52
# the catalog itself lives outside the repo in this workplace; checked when it is there
BUGS = REPO.parent / "shared" / "BUGS.md"


def _rows() -> dict[int, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| (\d+) \| (.+) \|$", line)
        if m:
            number = int(m.group(1))
            assert number not in rows, f"class {number} has two rows"
            rows[number] = m.group(2)
    return rows


def test_every_class_has_one_row():
    rows = _rows()
    assert sorted(rows) == list(range(1, CLASSES + 1)), sorted(set(range(1, CLASSES + 1)) ^ set(rows))
    if BUGS.exists():
        listed = {int(n) for n in re.findall(r"^(\d+)\. ", BUGS.read_text(), re.M)}
        assert listed == set(rows), sorted(listed ^ set(rows))


def test_every_row_names_a_check_and_a_planted_test():
    for number, row in _rows().items():
        cells = [c.strip() for c in row.split(" | ")]
        assert len(cells) == 3, f"class {number}: expected (class, check, planted test), got {len(cells)} cells"
        assert cells[1], f"class {number}: no check named"
        assert re.search(r"`tests/[^`]+::test_\w+", cells[2]), f"class {number}: no planted test"


def test_every_referenced_test_exists():
    problems = [f"class {number}: {why}" for number, row in _rows().items()
                for proof in re.findall(r"`(tests/[^`]+)`", row) if (why := missing_proof(proof))]
    assert not problems, problems
