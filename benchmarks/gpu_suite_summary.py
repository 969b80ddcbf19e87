"""Statuses per arch and family from the reports of one or more conformance runs, as Markdown.

    python benchmarks/gpu_suite_summary.py REPORT_DIR [REPORT_DIR ...]

Reads every <arch>.json (and <arch>.partial.json) in the folders (benchmarks/gpu_suite_run.sh
writes one folder per session) and prints one row per arch: pytest's totals, the run's status
and, per family, its statuses (p passed, F failed, E error, I interrupted, x xfailed, X xpassed,
s skipped, na not applicable); then the distinct reasons of the xfails and skips.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_conformance import report  # noqa: E402

SHORT = {"passed": "p", "failed": "F", "error": "E", "interrupted": "I", "blocked": "B", "xfailed": "x",
         "xpassed": "X", "skipped": "s", "not_applicable": "na"}


def _cell(counts: Counter) -> str:
    return " ".join(f"{n}{SHORT.get(status, status)}" for status, n in sorted(counts.items(), key=lambda kv: list(SHORT).index(kv[0]) if kv[0] in SHORT else 99))


def main(folders: list[str]) -> None:
    reports = [json.loads(p.read_text()) for folder in folders for p in sorted(Path(folder).glob("*.json"))]
    families = sorted({c["family"] for r in reports for c in r["checks"]})
    print("| arch | run | pytest totals | " + " | ".join(families) + " |")
    print("|---" * (3 + len(families)) + "|")
    total: Counter = Counter()
    reasons: dict[str, Counter] = defaultdict(Counter)
    for r in reports:
        per = defaultdict(Counter, report.family_counts(r["checks"]))
        for c in r["checks"]:
            total[c["status"]] += 1
            if c["status"] in ("xfailed", "skipped", "failed", "error", "interrupted"):
                why = (c.get("message") or "").split("\n")[0]
                reasons[c["status"]][why.split(" for ")[0] if c["status"] == "skipped" else f"{r['arch']}: {why}"] += 1
        totals = ", ".join(f"{n} {k}" for k, n in sorted(r.get("pytest_totals", {}).items()))
        print(f"| {r['arch']} | {r['run']['status']} | {totals} | " + " | ".join(_cell(per[f]) for f in families) + " |")
    print(f"\nAll archs: {', '.join(f'{n} {k}' for k, n in sorted(total.items()))}.")
    for status, found in reasons.items():
        print(f"\n{status}:\n")
        for why, n in found.most_common():
            print(f"- {n} x {why[:240]}")


if __name__ == "__main__":
    main(sys.argv[1:])
