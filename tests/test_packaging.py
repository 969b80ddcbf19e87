"""The wheel carries the suites, the built-in arch plugins (with their snapshots) and the
fixtures, registers the pytest plugin, and runs the suites with no checkout: installed into a
fresh folder, pytest started elsewhere collects the suites from inside the installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, text=True)
    (wheel,) = out.glob("moe_conformance-*.whl")
    return wheel


def test_wheel_contents_and_installed_run(tmp_path):
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("moe_conformance/_suites/test_logit_parity.py", "moe_conformance/_archs/kimi_k25.py",
                 "moe_conformance/_archs/__snapshots__/kimi_k25/test_schema.ambr",
                 "moe_conformance/_fixtures/tokenizer/tokenizer.json"):
        assert must in names, must
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "moe_conformance = moe_conformance.pytest_plugin" in entry_points

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--arch", "kimi_k25", "-k", "faithful and (logit_parity or schema)",
         "-p", "no:cacheprovider", "-v"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    where = subprocess.run([sys.executable, "-c", "from moe_conformance.paths import suites_dir; print(suites_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(site / "moe_conformance" / "_suites"), where
    report = json.loads((elsewhere / "reports" / "kimi_k25.partial.json").read_text())
    assert {c["status"] for c in report["checks"]} == {"passed"} and len(report["checks"]) == 7


def test_no_test_file_shares_a_basename_with_a_suite():
    """The project's tests run the suites in-process (pytester): a tests/ file named like a suite
    makes pytest refuse to import the suite ("import file mismatch") once the test is imported."""
    root = Path(__file__).resolve().parent.parent
    clash = {p.name for p in (root / "tests").rglob("test_*.py")} & {p.name for p in (root / "suites").glob("test_*.py")}
    assert not clash, f"rename these tests/ files: {sorted(clash)}"
