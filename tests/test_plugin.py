"""The pytest plugin end to end: options, discovery, validation errors, plugins from outside the
repo (entry point and --arch-plugin), reports, and xdist runs matching serial ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import checks_by_name, run_suites

REPO = Path(__file__).resolve().parent.parent


def test_plugin_import_is_light():
    """Merely having moe-conformance installed must not make every pytest run import torch."""
    code = ("import sys, moe_conformance.pytest_plugin, moe_conformance.registry, moe_conformance.report; "
            "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]; "
            "assert not heavy, heavy; print('light')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "light"


def test_plugin_dormant_without_arch(pytester):
    pytester.makepyfile(test_plain="def test_nothing_to_do_with_moe():\n    assert 1 + 1 == 2\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "moe-conformance:" not in result.stdout.str()


def test_options_live_in_their_own_group(pytester):
    result = pytester.runpytest("--help")
    out = result.stdout.str()
    section = out[out.index("MoE conformance suite"):]
    for option in ("--arch", "--arch-plugin", "--device", "--report-dir", "--seed"):
        assert option in section


def test_unknown_arch_lists_known_ones(pytester):
    result = pytester.runpytest("--arch", "kimi_k2_typo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown arch 'kimi_k2_typo'; known archs: *glm4_moe*kimi_k25*"])


@pytest.mark.parametrize("selection, expected", [
    ("kimi_k25", {"kimi_k25"}),
    ("glm4_moe,kimi_k25", {"glm4_moe", "kimi_k25"}),
    ("all", {"glm4_moe", "kimi_k25"}),
])
def test_arch_selection_and_ids(pytester, selection, expected):
    result = pytester.runpytest("--arch", selection, "--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [line for line in result.stdout.lines if "::" in line]
    archs = {line.split("[", 1)[1].split("-", 1)[0] for line in ids if "[" in line}
    assert expected <= archs and (selection == "all" or archs == expected)
    assert any(line.endswith("test_logit_parity[kimi_k25-faithful-plain]") for line in ids) == ("kimi_k25" in expected)


def test_header_names_what_is_under_test(pytester):
    result = pytester.runpytest("--arch", "kimi_k25", "--collect-only", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines([
        "moe-conformance: torch *, transformers *, triton *; device cpu; dtype float32; seed 0; *",
        "*arch kimi_k25 (*kimi_k25.py): reference transformers.DeepseekV3ForCausalLM(Kimi_K25Config.text_config), "
        "candidate moe_conformance.native.MoETransformer (mla, sigmoid router), variants faithful, grouped_yarn*",
    ])


BROKEN_IMPORT = "import moe_conformance\nraise ImportError('the team forgot to vendor its_kernels')\n"
BAD_FIELD = textwrap.dedent("""
    import dataclasses
    from moe_conformance.registry import discover
    known, _ = discover()
    ARCH = dataclasses.replace(known['glm4_moe'].load(), name='team_bad', candidate='not callable')
""")


def test_plugin_import_error_is_one_errored_case_per_check(pytester):
    result, reports = run_suites(pytester, suite="test_logit_parity.py", plugin_source=BROKEN_IMPORT, plugin_name="team_broken")
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors") == 5 and "passed" not in outcomes, outcomes
    result.stdout.fnmatch_lines(["*team_broken.py failed to import: ImportError: the team forgot to vendor its_kernels*"])
    statuses = {c["status"] for c in reports["team_broken"]["checks"]}
    assert statuses == {"error"}


def test_invalid_spec_names_plugin_and_field(pytester):
    result, _ = run_suites(pytester, suite="test_logit_parity.py", plugin_source=BAD_FIELD, plugin_name="team_bad_field")
    result.stdout.fnmatch_lines(["*arch plugin *team_bad_field.py: field 'candidate' must be callable (config -> model), got str*"])


TEAM_PLUGIN = textwrap.dedent("""
    '''A team's own arch, outside this repo: the built-in glm4_moe declaration under its name.'''
    import dataclasses
    from moe_conformance.registry import discover
    known, _ = discover()
    ARCH = dataclasses.replace(known['glm4_moe'].load(), name='team_glm')
""")


def test_arch_plugin_path_runs_the_suites_and_reports(pytester):
    result, reports = run_suites(pytester, "-k", "faithful", suite="test_logit_parity.py", plugin_source=TEAM_PLUGIN,
                                 plugin_name="team_glm_plugin")
    result.assert_outcomes(passed=5)
    report = reports["team_glm"]
    assert report["schema_version"] == 2 and report["arch"] == "team_glm"
    assert report["run"]["status"] == "partial"  # one suite file of all: a partial run, written as such
    assert {"environment", "config", "checks", "reference", "candidate"} <= set(report)
    check = checks_by_name(report)["test_logit_parity[team_glm-faithful-packed]"]
    assert check["family"] == "logit_parity" and check["status"] == "passed"
    assert check["figures"]["max_abs_logit_delta"] < check["thresholds"]["max_abs_logit_delta"]
    md = (pytester.path / "reports" / "team_glm.partial.md").read_text()
    assert "| logit_parity | 5 |" in md
    result.stdout.fnmatch_lines(["team_glm*logit_parity*5 passed"])


def test_entry_point_plugin_from_outside_the_repo(tmp_path):
    """An installed distribution registers its arch through the moe_conformance.archs group;
    pytest runs from a directory outside this repo, in a fresh process."""
    site = tmp_path / "site"
    (site / "team_arch-0.1.dist-info").mkdir(parents=True)
    (site / "team_arch-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: team-arch\nVersion: 0.1\n")
    (site / "team_arch-0.1.dist-info" / "entry_points.txt").write_text(
        "[moe_conformance.archs]\nteam_kimi = team_arch:ARCH\n")
    (site / "team_arch.py").write_text(textwrap.dedent("""
        import dataclasses
        from moe_conformance.registry import builtin_entries
        ARCH = dataclasses.replace(next(e for e in builtin_entries() if e.name == 'kimi_k25').load(), name='team_kimi')
    """))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--arch", "team_kimi", "--family", "contract,logit_parity,roundtrip,tiny_config",
         "-k", "faithful", "-q", "-p", "no:cacheprovider"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    report = json.loads((work / "reports" / "team_kimi.partial.json").read_text())
    assert report["plugin"] == "entry point team_kimi = team_arch:ARCH"
    families = {c["family"] for c in report["checks"] if c["status"] == "passed"}
    assert {"logit_parity", "roundtrip", "tiny_config"} <= families


def _figures(report):
    """Statuses and figures, less the wall-clock ones (timings differ between any two runs)."""
    return {c["name"]: (c["status"], {k: v for k, v in c["figures"].items() if "timing" not in k and "seconds" not in k})
            for c in report["checks"]}


@pytest.mark.slow
def test_xdist_run_matches_serial_run(tmp_path):
    """Same statuses AND figures with -n 2 as serially; reports written once, by the controller."""
    runs = {}
    for label, extra in (("serial", []), ("xdist", ["-n", "2"])):
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--arch", "kimi_k25,mixtral,gpt_oss", "--family",
             "contract,tiny_config,logit_parity,roundtrip,router_grad,sft,rl,engine_parity", "-q", "-p", "no:cacheprovider",
             "--report-dir", str(tmp_path / label), *extra],
            cwd=REPO, capture_output=True, text=True, timeout=900,
        )
        assert out.returncode == 0, out.stdout[-3000:]
        runs[label] = {p.stem: json.loads(p.read_text()) for p in (tmp_path / label).glob("*.json")}
        leftovers = [p.name for p in (tmp_path / label).iterdir() if p.name.endswith(".tmp")]
        assert not leftovers
    assert runs["serial"].keys() == runs["xdist"].keys() and len(runs["serial"]) >= 2
    for arch in runs["serial"]:
        assert _figures(runs["serial"][arch]) == _figures(runs["xdist"][arch]), arch



def test_triton_mode_is_chosen_before_any_conftest(monkeypatch):
    """Seen on an H200: a CPU default switched the Triton interpreter on for `--device cuda` (the
    repo's conftests import triton before pytest_configure), and every Triton kernel check failed
    on GPU tensors. The plugin decides at pytest_load_initial_conftests, and only for a
    conformance run."""
    import argparse

    from moe_conformance import pytest_plugin

    class EarlyConfig:
        def __init__(self, **known):
            self.known_args_namespace = argparse.Namespace(**known)

    for device, mode in (("cuda", "0"), ("cuda:1", "0"), ("cpu", "1")):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        pytest_plugin.pytest_load_initial_conftests(EarlyConfig(arch="kimi_k25", arch_plugin=[], device=device), None, [])
        assert os.environ.get("TRITON_INTERPRET") == mode, device
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest_plugin.pytest_load_initial_conftests(EarlyConfig(arch=None, arch_plugin=[], device="cpu"), None, [])
    assert "TRITON_INTERPRET" not in os.environ  # someone else's pytest run: untouched
