"""``moe-conformance diff``: regressions under the gate are flagged, noise is not."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from moe_conformance.diff import main

GATE = {"max_abs_logit_delta": 5e-4, "kl_mean": 1e-9, "top1_agreement": 1.0}
PARITY = "test_logit_parity[kimi_k25-faithful-plain]"


def _check(name=PARITY, status="passed", figures=None, thresholds=None, noise=None, message="", family="logit_parity"):
    record = {"name": name, "family": family, "variant": "faithful", "status": status, "message": message,
              "figures": dict(figures or {}), "thresholds": dict(thresholds or {}), "seconds": 0.5}
    if noise is not None:
        record["noise"] = dict(noise)
    return record


def _parity(delta=2e-5, kl=4e-12, top1=1.0, noise=True, **kw):
    return _check(figures={"max_abs_logit_delta": delta, "kl_mean": kl, "top1_agreement": top1, "tokens": 80,
                           "curves": {"panels": {"kl": {"candidate": [1, 2]}}}},
                  thresholds=GATE, noise={"max_abs_logit_delta": 3.8e-5, "kl_mean": 4.8e-12} if noise else None, **kw)


def _report(*checks, arch="kimi_k25"):
    return {"schema_version": 2, "arch": arch, "summary": {}, "checks": list(checks)}


def _write(tmp_path: Path, name: str, report: dict) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def _diff(tmp_path, base, head, *args, capsys):
    code = main([str(_write(tmp_path, "base.json", base)), str(_write(tmp_path, "head.json", head)), *args])
    return code, capsys.readouterr().out


def test_unchanged_report_exits_zero(tmp_path, capsys):
    report = _report(_parity(), _check("test_schema[kimi_k25-faithful]", figures={"keys": 42}))
    code, out = _diff(tmp_path, report, copy.deepcopy(report), capsys=capsys)
    assert code == 0
    assert "0 regression(s)" in out and "MOVED" not in out and "WORSE" not in out


def test_regression_under_the_gate_is_flagged(tmp_path, capsys):
    # 10x worse, still 2.5x under its 5e-4 gate: the check passes, the PR made it worse
    code, out = _diff(tmp_path, _report(_parity(2e-5)), _report(_parity(2e-4)), capsys=capsys)
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("WORSE")]
    assert PARITY in line and "max_abs_logit_delta 2e-05 -> 0.0002" in line and "gate <= 0.0005" in line
    assert "noise 3.8e-05" in line


def test_regression_without_a_noise_floor_uses_the_fallback(tmp_path, capsys):
    code, out = _diff(tmp_path, _report(_parity(2e-5, noise=False)), _report(_parity(2e-4, noise=False)), capsys=capsys)
    assert code == 1 and "no noise floor recorded" in out


def test_factor_decides_what_is_a_regression(tmp_path, capsys):
    base, head = _report(_parity(2e-5)), _report(_parity(2e-4))
    code, out = _diff(tmp_path, base, head, "--factor", "20", capsys=capsys)
    assert code == 0
    assert any(line.startswith("MOVED") and "max_abs_logit_delta" in line for line in out.splitlines())


@pytest.mark.parametrize(("base", "head", "noise"), [
    (2e-5, 3e-5, True),    # within the measured floor 3.8e-5
    (2e-5, 3.5e-5, False),  # 1.75x, under the 2x fallback
    (1e-13, 9e-13, False),  # 9x, but below 1e-12 absolute
])
def test_noise_level_changes_are_not_flagged(tmp_path, capsys, base, head, noise):
    code, out = _diff(tmp_path, _report(_parity(base, noise=noise)), _report(_parity(head, noise=noise)), capsys=capsys)
    assert code == 0
    assert "max_abs_logit_delta" not in out


def test_new_failure_exits_nonzero_and_says_why(tmp_path, capsys):
    failing = _parity(8.97, top1=0.45, status="failed",
                      message="kimi_k25-faithful on 'plain' inputs: max_abs_logit_delta = 8.97 (gate: <= 0.0005)\nmore")
    code, out = _diff(tmp_path, _report(_parity()), _report(failing), capsys=capsys)
    assert code == 1
    (line,) = [line for line in out.splitlines() if line.startswith("NEW FAILURE")]
    assert "passed -> failed" in line and "max_abs_logit_delta = 8.97" in line and "more" not in line


def test_a_new_check_that_fails_is_a_new_failure(tmp_path, capsys):
    new = _check("test_dry_run_roundtrip[kimi_k25-faithful]", status="error", message="boom", family="dry_run")
    code, out = _diff(tmp_path, _report(_parity()), _report(_parity(), new), capsys=capsys)
    assert code == 1 and "new -> error: boom" in out


def test_fix_added_and_removed_checks_are_listed_without_failing(tmp_path, capsys):
    base = _report(_parity(8.97, status="failed", message="too far"), _check("test_old[kimi_k25-faithful]"))
    head = _report(_parity(2e-5), _check("test_new[kimi_k25-faithful]"))
    code, out = _diff(tmp_path, base, head, capsys=capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert any(line.startswith("FIXED") and "failed -> passed" in line for line in lines)
    assert any(line.startswith("ADDED") and "test_new" in line for line in lines)
    assert any(line.startswith("REMOVED") and "test_old" in line for line in lines)
    # a failing base value above its upper gate, fixed in head, is an improvement, not "worse"
    assert not any(line.startswith("WORSE") for line in lines)


def test_ungated_figure_moves_are_shown_but_pass(tmp_path, capsys):
    base = _report(_check("test_dry_run_to_candidate[kimi_k25-faithful]", figures={"checkpoint_tensors": 69975}))
    head = _report(_check("test_dry_run_to_candidate[kimi_k25-faithful]", figures={"checkpoint_tensors": 23031}))
    code, out = _diff(tmp_path, base, head, capsys=capsys)
    assert code == 0 and "checkpoint_tensors 7e+04 -> 2.3e+04" in out


def test_lower_bound_gate_worse_when_its_margin_shrinks(tmp_path, capsys):
    name = "test_grpo[kimi_k25-faithful]"
    base = _report(_check(name, figures={"reward_gap": 0.5}, thresholds={"reward_gap": 0.05}))
    head = _report(_check(name, figures={"reward_gap": 0.1}, thresholds={"reward_gap": 0.05}))
    code, out = _diff(tmp_path, base, head, capsys=capsys)
    assert code == 1 and "gate >= 0.05" in out and "9x worse" in out


def test_nan_figure_is_worse(tmp_path, capsys):
    code, out = _diff(tmp_path, _report(_parity(2e-5)), _report(_parity("nan")), capsys=capsys)
    assert code == 1 and "-> nan" in out


def test_markdown_for_a_pr_comment(tmp_path, capsys):
    base = _report(_parity(2e-5), _check("test_gone[kimi_k25-faithful]"))
    head = _report(_parity(2e-4), _check("test_schema[kimi_k25-faithful]", status="failed", message="a | b"))
    out_file = tmp_path / "comment.md"
    code = main([str(_write(tmp_path, "b.json", base)), str(_write(tmp_path, "h.json", head)), "--markdown",
                 "--output", str(out_file)])
    assert code == 1 and capsys.readouterr().out == ""
    md = out_file.read_text()
    assert md.startswith("## MoE conformance: changes in this PR")
    assert "**2 regression(s)**" in md
    assert f"| `{PARITY}` | max_abs_logit_delta | 2e-05 | 0.0002 | x10 | <= 0.0005 | 3.8e-05 |" in md
    assert "| `test_schema[kimi_k25-faithful]` | new | failed | a \\| b |" in md
    assert "### Checks removed (1)" in md


def test_folders_of_reports_prefer_the_complete_one(tmp_path, capsys):
    _write(tmp_path, "base/kimi_k25.json", _report(_parity(2e-5)))
    _write(tmp_path, "head/kimi_k25.json", _report(_parity(2e-5)))
    _write(tmp_path, "head/kimi_k25.partial.json", _report(_parity(2e-3)))  # a filtered rerun: ignored
    _write(tmp_path, "head/glm4_moe.partial.json", _report(_check("test_x[glm4_moe-faithful]"), arch="glm4_moe"))
    (tmp_path / "head" / "notes.json").write_text("[1, 2]")
    code = main(["diff", str(tmp_path / "base"), str(tmp_path / "head")])  # as `moe-conformance diff ...`
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ADDED" in out and "test_x[glm4_moe-faithful]" in out and "max_abs_logit_delta" not in out


def test_unreadable_input_is_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main([str(bad), str(bad)]) == 2
    assert "moe-conformance diff:" in capsys.readouterr().err
    assert main([str(_write(tmp_path, "x.json", {"a": 1})), str(bad)]) == 2


def test_on_a_real_report(tmp_path, capsys):
    """The schema the suite writes (a dry-run report of the released Mixtral, ~10 s)."""
    import subprocess
    import sys

    plugin = tmp_path / "released_mixtral.py"
    plugin.write_text("from transformers import MixtralConfig\nfrom moe_conformance.dryrun import released_config\n"
                      "from moe_conformance.registry import discover\n"
                      "ARCH = discover()[0]['mixtral'].load().replace(name='mixtral_released', "
                      "released=released_config('mixtral', MixtralConfig))\n")
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--arch-plugin", str(plugin),
                    str(root / "suites" / "test_dry_run.py"), "--report-dir", str(tmp_path / "reports")],
                   cwd=root, check=True, capture_output=True, timeout=300)
    (report_file,) = [p for p in (tmp_path / "reports").glob("mixtral_released*.json")]
    assert main([str(report_file), str(report_file)]) == 0
    head = json.loads(report_file.read_text())
    (params,) = [c for c in head["checks"] if c["name"].startswith("test_dry_run_parameters")]
    params["figures"]["params_delta"] = 3  # gated at 0: any change is a regression
    assert main([str(report_file), str(_write(tmp_path, "head.json", head))]) == 1
    out = capsys.readouterr().out
    assert "WORSE" in out and "params_delta 0 -> 3" in out
