"""Each planted contract violation (tests/planted_contract.py) fails exactly its contract check,
naming the convention, with no cascade: every other check either passes or is blocked by that
one root cause, and the summary prints one root cause per case."""

from __future__ import annotations

import pytest

from helpers import assert_totals_match, checks_by_name, run_suites
from planted_contract import VIOLATIONS


@pytest.mark.parametrize("violation", sorted(VIOLATIONS))
def test_contract_violation_is_one_root_cause(pytester, violation):
    _, _, check, fragments = VIOLATIONS[violation]
    name = f"kimi_k25_{violation}"
    result, reports = run_suites(pytester, "--family", "contract,logit_parity,roundtrip,router_grad", "-k", "faithful",
                                 plugin_source=f"import planted_contract\nARCH = planted_contract.build({violation!r})\n",
                                 plugin_name=f"contract_{violation}")
    checks = checks_by_name(reports[name])
    failed = {n: c for n, c in checks.items() if c["status"] in ("failed", "error")}
    assert set(failed) == {f"{check}[{name}-faithful]"}, {n: c["message"][:200] for n, c in failed.items()}
    message = failed[f"{check}[{name}-faithful]"]["message"]
    for fragment in fragments:
        assert fragment in message, message
    blocked = [c for c in checks.values() if c["status"] == "blocked"]
    assert blocked, "nothing depends on the broken convention?"
    assert len({c["root_cause"] for c in blocked}) == 1, {c["root_cause"] for c in blocked}
    out = result.stdout.str()
    assert out.count("root cause: ") == 1 and f"{name}-faithful: contract" in out, out[-2000:]
    assert_totals_match(result, reports)
