"""The gate never lies: a check is passed only when its body returned, whatever happens to the
run (a worker killed mid-check, SIGINT, SIGTERM, a hanging candidate), the report's totals are
pytest's own, partial runs never replace a complete report, and a plugin's claims (duplicate
names, understated capabilities, loosened gates) are checked or shown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import assert_totals_match, checks_by_name, kimi_copy, run_suites

# A candidate whose forward misbehaves in one check only: the logit-parity check on left-padded
# inputs (PYTEST_CURRENT_TEST names the running test and phase).
MISBEHAVING = textwrap.dedent("""
    def misbehaving(config):
        model = base.candidate(config)
        forward = model.forward

        def run(*args, **kwargs):
            if "left_padded] (call)" in os.environ.get("PYTEST_CURRENT_TEST", ""):
                ACTION()
            return forward(*args, **kwargs)

        model.forward = run
        return model

    ARCH = replace(base, name=NAME, candidate=misbehaving)
""")


def _misbehaving(name: str, action: str) -> str:
    return kimi_copy(name, f"NAME = {name!r}\n{action}\n" + MISBEHAVING)


FAST = ("--family", "logit_parity", "-k", "faithful")


def test_a_worker_killed_mid_check_is_not_a_pass(pytester):
    source = _misbehaving("killed", "def ACTION():\n    os.kill(os.getpid(), 9)")
    result, reports = run_suites(pytester, *FAST, "-n", "2", plugin_source=source, plugin_name="killed_plugin",
                                 subprocess=True)
    checks = checks_by_name(reports["killed"])
    crashed = checks["test_logit_parity[killed-faithful-left_padded]"]
    assert crashed["status"] in ("failed", "error"), crashed
    assert all(c["status"] == "passed" for n, c in checks.items() if "left_padded" not in n), checks
    assert_totals_match(result, reports)


def _popen(pytester, source: str, name: str, *args: str) -> subprocess.Popen:
    plugin = pytester.makepyfile(**{f"{name}_plugin": source})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a shell without job control starts background jobs with SIGINT ignored, and a child inherits
    # that (Python then installs no KeyboardInterrupt handler): give the run Ctrl-C's default, as
    # in a terminal, whoever launched these tests
    return subprocess.Popen([sys.executable, "-m", "pytest", "--arch-plugin", str(plugin), "--report-dir",
                             str(pytester.path / "reports"), "-p", "no:cacheprovider", *args],
                            cwd=pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_is_marked_and_keeps_the_complete_report(pytester, sig):
    marker = pytester.path / "in_flight"
    source = _misbehaving("stopped", f"def ACTION():\n    open({str(marker)!r}, 'w').close()\n    time.sleep(120)")
    complete = pytester.path / "reports" / "stopped.json"
    complete.parent.mkdir()
    complete.write_text('{"run": {"status": "complete"}}\n')
    proc = _popen(pytester, source, "stopped", *FAST)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), proc.communicate()[0][-3000:]
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert complete.read_text() == '{"run": {"status": "complete"}}\n', "an interrupted run replaced the complete report"
    report = json.loads((pytester.path / "reports" / "stopped.partial.json").read_text())
    assert report["run"]["status"] == "interrupted" and report["run"]["interrupted_by"] == sig.name, report["run"]
    checks = checks_by_name(report)
    in_flight = checks["test_logit_parity[stopped-faithful-left_padded]"]
    assert in_flight["status"] == "interrupted", in_flight
    assert "stopped" in out and "moe-conformance" in out


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_a_hanging_candidate_times_out_naming_the_check_and_the_run_goes_on(pytester, workers):
    source = _misbehaving("hangs", "def ACTION():\n    time.sleep(1000)")
    result, reports = run_suites(pytester, *FAST, "--check-timeout", "8", *workers, plugin_source=source,
                                 plugin_name="hangs_plugin", subprocess=True)
    checks = checks_by_name(reports["hangs"])
    hung = checks["test_logit_parity[hangs-faithful-left_padded]"]
    assert hung["status"] == "failed", hung
    for fragment in ("test_logit_parity[hangs-faithful-left_padded]", "ran past its 8 s timeout", "it was running",
                     "in ACTION", "test_logit_parity.py"):
        assert fragment in hung["message"], hung["message"]
    assert sum(c["status"] == "passed" for c in checks.values()) == 4
    assert_totals_match(result, reports)


def test_two_plugins_declaring_one_arch_name_are_an_error_naming_both(pytester):
    a = pytester.makepyfile(first=kimi_copy("team_arch"))
    b = pytester.makepyfile(second=kimi_copy("team_arch"))
    result = pytester.runpytest("--arch-plugin", str(a), "--arch-plugin", str(b), "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "arch 'team_arch' is declared by both" in err and "first.py" in err and "second.py" in err, err


def test_plugin_files_with_one_basename_both_load(pytester):
    for folder, name in (("team_a", "arch_a"), ("team_b", "arch_b")):
        (pytester.path / folder).mkdir()
        (pytester.path / folder / "plugin.py").write_text(kimi_copy(name))
    result = pytester.runpytest("--arch-plugin", "team_a/plugin.py", "--arch-plugin", "team_b/plugin.py",
                                "--collect-only", "-q", "-p", "no:cacheprovider")
    out = result.stdout.str()
    assert "[arch_a-faithful" in out and "[arch_b-faithful" in out, out


@pytest.mark.parametrize("arg, message", [
    ("missing/plugin.py", "--arch-plugin missing/plugin.py: no such file"),
    ("folder", "is a directory"),
    ("not a module!", "neither a .py file nor an importable module name"),
])
def test_bad_plugin_arguments_are_usage_errors_naming_them(pytester, arg, message):
    (pytester.path / "folder").mkdir()
    result = pytester.runpytest("--arch-plugin", arg, "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str(), result.stderr.str()


def test_empty_archs_is_an_error_naming_the_plugin(pytester):
    result, reports = run_suites(pytester, "--family", "contract", plugin_source="ARCHS = []\n", plugin_name="empty_plugin")
    (report,) = reports.values()
    messages = {c["message"] for c in report["checks"]}
    assert all("empty_plugin.py: ARCHS must be a non-empty list of ArchSpec" in m for m in messages), messages


def test_an_unwritable_report_dir_fails_before_any_check_runs(pytester):
    (pytester.path / "a_file").write_text("")
    result = pytester.runpytest("--arch", "kimi_k25", "--report-dir", str(pytester.path / "a_file" / "reports"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not writable" in result.stderr.str() and "a_file" in result.stderr.str()
    assert "passed" not in result.stdout.str()


MUTATING = textwrap.dedent("""
    class Mutating:
        def __init__(self, base):
            self.base = base

        def __getattr__(self, name):
            return getattr(self.base, name)

        def to_candidate(self, sd, config):
            out = self.base.to_candidate(dict(sd), config)
            sd.pop(next(iter(sd)))  # the bug: the input state loses a key
            return out

        def to_hf(self, sd, config):
            return self.base.to_hf(sd, config)

    ARCH = replace(base, name="mutating", converter=Mutating(base.converter))
""")


def test_a_mutating_converter_is_named_and_corrupts_nothing(pytester):
    result, reports = run_suites(pytester, "--family", "contract,roundtrip", "-k", "faithful",
                                 plugin_source=kimi_copy("mutating", MUTATING), plugin_name="mutating_plugin")
    checks = checks_by_name(reports["mutating"])
    contract = checks["test_contract_converter[mutating-faithful]"]
    assert contract["status"] == "failed" and "to_candidate mutates its input" in contract["message"], contract
    assert not any("KeyError" in c["message"] for c in checks.values())
    assert_totals_match(result, reports)


def test_loosened_gates_are_shown_in_the_header_and_the_report(pytester):
    source = kimi_copy("loose", 'ARCH = replace(base, name="loose", tolerances={"logit_parity.max_abs_logit_delta": 1e9})\n')
    result, reports = run_suites(pytester, "--family", "contract", "-k", "faithful", plugin_source=source,
                                 plugin_name="loose_plugin")
    result.stdout.fnmatch_lines(["*LOOSENED GATE: logit_parity.max_abs_logit_delta: <= 1e+09 instead of <= 0.0005*"])
    report = reports["loose"]
    assert report["loosened_gates"] and "looser than the measured profile" in report["loosened_gates"][0]
    md = (pytester.path / "reports" / "loose.partial.md").read_text()
    assert "Loosened gates" in md and "logit_parity.max_abs_logit_delta" in md


def test_understated_capabilities_fail_the_contract_naming_the_field(pytester):
    source = kimi_copy("modest", 'ARCH = replace(base, name="modest", capabilities=replace(base.capabilities, '
                                 'shared_experts=False, correction_bias=False))\n')
    result, reports = run_suites(pytester, "--family", "contract,router_grad", "-k", "faithful", plugin_source=source,
                                 plugin_name="modest_plugin")
    checks = checks_by_name(reports["modest"])
    contract = checks["test_contract_capabilities[modest-faithful]"]
    assert contract["status"] == "failed", contract
    assert "capabilities.shared_experts=False, but the reference config/checkpoint has shared experts" in contract["message"]
    assert "capabilities.correction_bias=False, but the checkpoint has e_score_correction_bias" in contract["message"]
    shared = checks["test_shared_experts_get_gradient[modest-faithful]"]
    assert shared["status"] == "not_applicable" and "the plugin declares" in shared["message"], shared
    assert_totals_match(result, reports)


def test_the_hub_is_forced_offline_even_when_the_user_says_otherwise(pytester, monkeypatch):
    seen = pytester.path / "seen"
    source = kimi_copy("hub", textwrap.dedent(f"""
        def build(config):
            open({str(seen)!r}, "w").write(os.environ.get("HF_HUB_OFFLINE", "unset"))
            return base.candidate(config)

        ARCH = replace(base, name="hub", candidate=build)
    """))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    run_suites(pytester, "--family", "contract", "-k", "faithful and forward", plugin_source=source,
               plugin_name="hub_plugin", subprocess=True)
    assert seen.read_text() == "1"


def test_a_renamed_copy_gets_the_figures_of_the_original(pytester):
    result, reports = run_suites(pytester, "--arch", "kimi_k25,kimi_renamed", "--family", "logit_parity", "-k", "faithful",
                                 plugin_source=kimi_copy("kimi_renamed"), plugin_name="renamed_plugin")
    original, copy = checks_by_name(reports["kimi_k25"]), checks_by_name(reports["kimi_renamed"])
    for name, c in original.items():
        twin = copy[name.replace("kimi_k25", "kimi_renamed")]
        assert c["figures"] == twin["figures"], (name, c["figures"], twin["figures"])


def test_reports_are_readable_by_others_and_complete_runs_say_so(pytester):
    result, reports = run_suites(pytester, "--arch", "glm4_moe", "--family", "contract")
    path = pytester.path / "reports" / "glm4_moe.partial.json"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    run = reports["glm4_moe"]["run"]
    assert run["status"] == "partial" and run["selection"]["families"] == ["contract"]
    assert run["exit_code"] == 0 and run["id"] and run["started"] <= run["ended"]
    assert_totals_match(result, reports)
