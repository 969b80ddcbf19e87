"""Running the conformance suites inside the project's own tests."""

from __future__ import annotations

import json
from pathlib import Path

from moe_conformance.paths import suites_dir

TESTS_DIR = Path(__file__).resolve().parent


def run_suites(pytester, *args, suite: str | None = None, plugin_source: str | None = None, plugin_name="team_plugin",
               subprocess: bool = False):
    """Run the conformance suites in a pytester sandbox; returns (result, reports by arch)."""
    pytester.syspathinsert(TESTS_DIR)
    argv = [str(suites_dir() / suite)] if suite else []
    if plugin_source is not None:
        plugin = pytester.makepyfile(**{plugin_name: plugin_source})
        argv += ["--arch-plugin", str(plugin)]
    report_dir = pytester.path / "reports"
    argv += ["--report-dir", str(report_dir), "-p", "no:cacheprovider", *args]
    if subprocess:
        result = pytester.runpytest_subprocess(*argv, timeout=600)
    else:
        result = pytester.runpytest(*argv)
    # by arch, whether the run was complete (<arch>.json) or filtered (<arch>.partial.json)
    reports = {r["arch"]: r for r in (json.loads(p.read_text()) for p in sorted(report_dir.glob("*.json")))}
    return result, reports


PYTEST_CATEGORIES = {"passed": "passed", "failed": "failed", "errors": "error", "skipped": "skipped",
                     "xfailed": "xfailed", "xpassed": "xpassed"}


def assert_totals_match(result, reports: dict) -> None:
    """The reports' pytest totals, summed over archs, are pytest's own summary line."""
    outcomes = result.parseoutcomes()
    pytest_says = {PYTEST_CATEGORIES[k]: v for k, v in outcomes.items() if k in PYTEST_CATEGORIES and v}
    reported: dict[str, int] = {}
    for report in reports.values():
        for k, v in report["pytest_totals"].items():
            reported[k] = reported.get(k, 0) + v
    assert reported == pytest_says, f"report totals {reported} != pytest's {pytest_says}"


def kimi_copy(name: str, body: str = "") -> str:
    """Plugin source: kimi_k25 under another name, with ``body`` (Python, using ``base`` and
    ``replace``) defining ARCH; without body the copy is unchanged."""
    return (f"import dataclasses, os, time\nimport torch\nfrom moe_conformance.registry import builtin_entries\n"
            f"base = next(e for e in builtin_entries() if e.name == 'kimi_k25').load()\n"
            f"replace = dataclasses.replace\n"
            + (body if body else f"ARCH = replace(base, name={name!r})\n"))


def checks_by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def run_planted_bug(pytester, module: str, bug: str, suite: str, variant: str, check: str, fragments: list[str],
                    args: tuple[str, ...] = ()):
    """Run ``suite`` (with ``args``) on ``<module>.build(bug)`` and assert that ``check`` failed
    (on every parametrization that did fail) with a message holding each fragment. Returns the
    failing check records by test name."""
    result, reports = run_suites(
        pytester, "-k", variant, *args, suite=suite, plugin_name=f"{module}_{bug}",
        plugin_source=f"import {module}\nARCH = {module}.build({bug!r})\n",
    )
    (report,) = reports.values()
    failed = {name: c for name, c in checks_by_name(report).items() if c["status"] == "failed"}
    hits = {name: c for name, c in failed.items() if name.startswith(check + "[")}
    assert hits, f"{bug}: {check} did not fail; failed checks: {sorted(failed)}\n{result.stdout.str()[-3000:]}"
    for name, c in hits.items():
        for fragment in fragments:
            assert fragment in c["message"], f"{bug}: {name} message lacks {fragment!r}:\n{c['message']}"
    return hits


def missing_proof(proof: str) -> str | None:
    """Why ``tests/file.py::test_name[case]`` names no test of this repo, or None when it does: the
    file defines the function, and each part of the case is a case of it (in the file or in a
    planted-bug module it imports)."""
    repo = Path(__file__).resolve().parent.parent
    path, _, test = proof.partition("::")
    function, _, param = test.partition("[")
    source = (repo / path).read_text() if (repo / path).exists() else ""
    cases = source + "".join(p.read_text() for p in (repo / "tests").glob("planted*.py")
                             if f"from {p.stem} import" in source or f"import {p.stem}" in source)
    if f"def {function}(" not in source:
        return f"{proof} does not exist"
    if param and not all(repr(p) in cases or f'"{p}"' in cases for p in param.rstrip("]").split("-")):
        return f"{proof}: no case {param.rstrip(']')!r} in {path}"
    return None
