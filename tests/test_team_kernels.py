"""Kernels registered from outside the repo (tests/foreign/team_kernels.py, a plain-torch
KernelSubject) are checked like the bundled ones: the correct ones pass, and each planted fault
fails the kernel check set naming the kernel, the stage and the case. A plugin that declares no
kernels does not run the bundled ones unless asked."""

from __future__ import annotations

import pytest

from helpers import checks_by_name, kimi_copy, run_suites

# fault -> the stage whose check must fail, and what the message must say
EXPECTED = {
    "writes_outside_rows": ("[experts]", "the kernel wrote into its input x"),
    "unwritten_rows": ("[experts]", "got nan"),
    "bf16_combine": ("[combine]", "scaled error"),
    "drops_weight_grad": ("[experts]", "grad_weights is None (run 1)"),
    "zero_token_expert": ("[experts]", "expert(s) with no token"),
    "ignores_bias": ("[route]", "+bias"),
}


def _plugin(fault: str | None) -> str:
    return kimi_copy("team_kernels_arch", "import team_kernels\n"
                     f"ARCH = replace(base, name='team_kernels_arch', kernels=(team_kernels.subject({fault!r}),))\n")


def _run(pytester, fault):
    pytester.syspathinsert(pytester.path.parent)
    import shutil
    from pathlib import Path

    shutil.copy(Path(__file__).parent / "foreign" / "team_kernels.py", pytester.path / "team_kernels.py")
    return run_suites(pytester, "--family", "kernels", "-k", "faithful", plugin_source=_plugin(fault),
                      plugin_name=f"team_{fault}")


def test_correct_team_kernels_pass(pytester):
    _, reports = _run(pytester, None)
    checks = checks_by_name(reports["team_kernels_arch"])
    check_set = checks["test_kernel_check_set[team_kernels_arch-faithful]"]
    assert check_set["status"] == "passed" and check_set["figures"]["kernels"] == ["team"], check_set
    assert checks["test_reference_with_kernel_experts[team_kernels_arch-faithful]"]["status"] == "passed"
    # the team's subject declares no use_in: the candidate is not switched, and says why
    assert checks["test_candidate_on_kernels_matches_reference[team_kernels_arch-faithful]"]["status"] == "not_applicable"


@pytest.mark.parametrize("fault", sorted(EXPECTED))
def test_a_faulty_team_kernel_is_named(pytester, fault):
    stage, fragment = EXPECTED[fault]
    _, reports = _run(pytester, fault)
    check = checks_by_name(reports["team_kernels_arch"])["test_kernel_check_set[team_kernels_arch-faithful]"]
    assert check["status"] == "failed", check
    for part in (stage, f"backend=team_{fault}", "T=", fragment):
        assert part in check["message"], check["message"]


def test_no_declared_kernels_runs_none_unless_asked(pytester):
    _, reports = run_suites(pytester, "--arch", "qwen3_moe", "--family", "kernels", "-k", "faithful")
    statuses = {c["status"] for c in reports["qwen3_moe"]["checks"]}
    assert statuses == {"not_applicable"}, statuses


def test_the_sweep_profile_draws_more_cases(pytester):
    """`--hypothesis-profile moe-conformance-sweep` (hypothesis' own option; the plugin registers
    the profile before hypothesis loads it, so in a fresh process): more drawn cases than a PR
    run, on every variant, still passing."""
    cases = {}
    for profile in ("default", "moe-conformance-sweep"):
        args = ["--arch", "qwen3_moe", "--family", "kernels", "--kernels", "torch", "-k", "test_kernel_check_set"]
        result, reports = run_suites(pytester, *args, *(["--hypothesis-profile", profile] if profile != "default" else []),
                                     subprocess=True)
        assert result.ret == 0, result.stdout.str()[-2000:]
        checks = checks_by_name(reports["qwen3_moe"])
        assert {c["status"] for c in checks.values() if c["status"] != "deselected"} == {"passed"}, checks
        cases[profile] = {name: c["figures"]["cases"] for name, c in checks.items() if c["status"] == "passed"}
    for name, n in cases["default"].items():
        assert cases["moe-conformance-sweep"][name] > 2 * n, (name, n, cases)
