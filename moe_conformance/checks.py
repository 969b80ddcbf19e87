"""What each conformance check needs, declared next to it.

Suites are plain test functions over the ``arch`` fixture. ``@conformance(...)`` says what a
check needs from the candidate contract (``requires``: items of moe_conformance.contract_checks)
and when it applies at all (``applies(case)`` or ``applies(case, params)`` with the test's
parameters: why not, from declared capabilities and probes), and what it checks (``subject``):
the candidate (the default), the reference (transformers' own behaviour), kernels, or the
plugin's own declarations (its tiny configs). The pytest plugin reads this before a check
runs: a check that does not apply is reported "not applicable" with what to declare; a check
whose contract item is broken is reported "blocked by contract" with the one root cause. Only
``subject="candidate"`` checks count as conformance checks of the candidate in the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_REQUIRES = ("forward", "converter", "state", "deterministic")
SUBJECTS = ("candidate", "reference", "kernels", "plugin")


ANY_DTYPE = ("float32", "bfloat16")


@dataclass(frozen=True)
class CheckInfo:
    requires: tuple[str, ...] = DEFAULT_REQUIRES
    applies: Callable[[Any], str | None] | None = None
    subject: str = "candidate"
    # the --dtype runs the check has gates for (checks of declarations or bits run at any)
    dtypes: tuple[str, ...] = ("float32",)
    # why it has no gates in the other dtypes (measured), shown where it does not apply
    dtypes_why: str = ""


def conformance(*, requires: tuple[str, ...] = DEFAULT_REQUIRES, applies: Callable[[Any], str | None] | None = None,
                subject: str = "candidate", dtypes: tuple[str, ...] = ("float32",), dtypes_why: str = "") -> Callable:
    if subject not in SUBJECTS:
        raise ValueError(f"subject must be one of {SUBJECTS}, got {subject!r}")

    def mark(fn: Callable) -> Callable:
        fn.moe_check = CheckInfo(tuple(requires), applies, subject, tuple(dtypes), dtypes_why)
        return fn

    return mark


def info_of(fn: Callable | None) -> CheckInfo:
    return getattr(fn, "moe_check", None) or CheckInfo()


# ---- applicability, from declarations (a check that does not apply says what to declare)


def needs_capability(flag: str, what: str) -> Callable[[Any], str | None]:
    def applies(case) -> str | None:
        if getattr(case.spec.capabilities, flag):
            return None
        return f"capabilities.{flag} is False: the plugin declares {what}"
    return applies


def needs_routing_field(field: str) -> Callable[[Any], str | None]:
    def applies(case) -> str | None:
        if field in case.routing_fields():
            return None
        return (f"the candidate's routing probes give no {field}: declare RouterProbe(read=...) returning "
                f"RouterReading({field}=...) to run this check")
    return applies


def needs_forcing(case) -> str | None:
    from .probing import can_force

    why = can_force(case)
    return None if why is None else f"routing cannot be forced on the candidate: {why}"


def needs_router_module(case) -> str | None:
    from .probing import routing_layers

    if any(layer.router for layer in routing_layers(case, "cand")):
        return None
    return "no module pair with role 'router' is declared: declare ModulePair(ref_router, cand_router, role='router')"


def all_of(*conditions: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    def applies(case) -> str | None:
        for condition in conditions:
            why = condition(case)
            if why:
                return why
        return None
    return applies


def applicability(info: CheckInfo, case, params: dict) -> str | None:
    dtype = str(case.dtype).removeprefix("torch.")
    if dtype not in info.dtypes and info.dtypes_why:
        return f"this check has gates for {', '.join(info.dtypes)} only (--dtype {dtype}): {info.dtypes_why}"
    if dtype not in info.dtypes:
        return (f"this check has gates for {', '.join(info.dtypes)} only (--dtype {dtype}: the bf16 production "
                f"profile covers the contract, logit_parity, roundtrip, schema, kernels and dry_run families, "
                f"router_grad's gradient-flow and bias-update checks, sft but its router health and checkpoint reload, "
                f"and rl but routing replay)")
    if info.applies is None:
        return None
    import inspect

    takes_params = len(inspect.signature(info.applies).parameters) >= 2
    return info.applies(case, params) if takes_params else info.applies(case)
