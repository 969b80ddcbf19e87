"""``moe-conformance diff BASE HEAD``: what a PR changed in the conformance reports.

BASE and HEAD are report JSON files (``reports/<arch>.json``) or folders of them (every arch of
a run). Checks are matched by name (``test_logit_parity[kimi_k25-faithful-plain]``). Printed:

- new failures (a check that passed, was skipped or is new, now failed/errored/interrupted) and
  fixes (the reverse); other status changes; checks added and removed;
- figures that moved beyond their noise, even far under their gate: numeric scalar figures
  only (curves and tables are not compared);
- regressions: new failures, and gated figures (those with a threshold) that got worse by more
  than ``--factor`` (default 2x) beyond noise.

Noise: a check record may carry ``"noise": {figure: floor}`` (the measured floor behind its
tolerance profile). A figure moved when ``|head - base| > floor``. Without a floor, the fallback
is: moved when the value changed by more than ``FALLBACK_RELATIVE`` (2x either way, or from 0)
and by more than ``FALLBACK_ABSOLUTE`` (1e-12, below any figure a check gates).

"Worse" for a gate: an upper bound (``<= limit``) got worse when the value grew by more than the
factor (over ``max(base, floor)``); a lower bound (``>= limit``) when its margin over the limit
shrank by more than the factor. Which bound a threshold is comes from the tolerance profiles'
gates of that name, else from a passing base value (above the limit: a lower bound), else an
upper bound.

Exit status: 1 when there is a regression, 0 otherwise (2 for unreadable input).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FALLBACK_RELATIVE = 2.0
FALLBACK_ABSOLUTE = 1e-12
DEFAULT_FACTOR = 2.0
BAD_STATUSES = frozenset({"failed", "error", "interrupted"})


# ------------------------------------------------------------------------------------------
# reading


def read_checks(path: Path) -> dict[str, dict[str, Any]]:
    """Check records by name from a report file or a folder of reports. In a folder, an arch's
    complete report wins over its ``.partial`` one."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        complete = {f.name.removesuffix(".json") for f in files if not f.name.endswith(".partial.json")}
        files = [f for f in files if not (f.name.endswith(".partial.json")
                                          and f.name.removesuffix(".partial.json") in complete)]
    else:
        files = [path]
    checks: dict[str, dict[str, Any]] = {}
    for file in files:
        report = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(report, dict) or not isinstance(report.get("checks"), list):
            if path.is_dir():
                continue  # some other JSON in the folder
            raise ValueError(f"{file}: not a moe-conformance report (no 'checks' list)")
        for check in report["checks"]:
            checks[check["name"]] = check
    return checks


def number(value: Any) -> float | None:
    """A numeric scalar figure as a float; the report writes NaN/inf as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(value)
    return None


def _known_lower_bounds() -> frozenset[str]:
    """Figure names gated from below in the tolerance profiles (agreement, spread...)."""
    try:
        from . import tolerances
    except Exception:  # noqa: BLE001 - the diff must run on reports alone
        return frozenset()
    return frozenset(name for profile in tolerances.PROFILES.values()
                     for name, gate in profile.gates.items() if gate.at_least)


# ------------------------------------------------------------------------------------------
# comparing


@dataclass(frozen=True)
class Move:
    check: str
    figure: str
    base: float
    head: float
    noise: float | None
    limit: float | None = None
    lower_bound: bool = False
    worse_by: float | None = None  # set when this is a gated regression

    @property
    def ratio(self) -> float:
        if self.base == 0:
            return math.inf if self.head != 0 else 1.0
        return self.head / self.base


@dataclass(frozen=True)
class StatusChange:
    check: str
    base: str | None  # None: the check is new
    head: str | None  # None: the check is gone
    message: str = ""


@dataclass
class Diff:
    new_failures: list[StatusChange] = field(default_factory=list)
    fixed: list[StatusChange] = field(default_factory=list)
    other_status: list[StatusChange] = field(default_factory=list)
    added: list[StatusChange] = field(default_factory=list)
    removed: list[StatusChange] = field(default_factory=list)
    worse: list[Move] = field(default_factory=list)  # gated figures, regression
    moved: list[Move] = field(default_factory=list)  # everything else beyond noise

    @property
    def regressions(self) -> int:
        return len(self.new_failures) + len(self.worse)


def moved_beyond_noise(base: float, head: float, noise: float | None) -> bool:
    if math.isnan(base) or math.isnan(head):
        return math.isnan(base) != math.isnan(head)
    if base == head:
        return False
    if math.isinf(base) or math.isinf(head):
        return True
    delta = abs(head - base)
    if noise is not None:
        return delta > noise
    if delta <= FALLBACK_ABSOLUTE:
        return False
    if base == 0 or head == 0 or (base < 0) != (head < 0):
        return True
    ratio = abs(head / base)
    return ratio > FALLBACK_RELATIVE or ratio < 1 / FALLBACK_RELATIVE


def worse_factor(base: float, head: float, limit: float, lower_bound: bool, noise: float | None) -> float:
    """How many times worse ``head`` is than ``base`` against its gate (1: not worse)."""
    if math.isnan(head):
        return math.inf
    floor = noise or 0.0
    if lower_bound:
        base_margin, head_margin = base - limit, head - limit
        if head >= base or base_margin <= 0:
            return 1.0  # improved, or already at/under the limit (the status says so)
        return math.inf if head_margin <= max(floor, 0.0) else base_margin / head_margin
    if head <= base:
        return 1.0
    scale = max(abs(base), floor)
    return math.inf if scale == 0 else head / scale


def _noise(base: dict[str, Any], head: dict[str, Any], figure: str) -> float | None:
    floors = [number((c.get("noise") or {}).get(figure)) for c in (base, head)]
    floors = [f for f in floors if f is not None and math.isfinite(f)]
    return max(floors) if floors else None


def is_lower_bound(figure: str, base: dict[str, Any], limit: float, lower_bounds: frozenset[str]) -> bool:
    """Whether ``figure``'s threshold is a ``>=`` gate: named so in the tolerance profiles, else
    read off the base when its check passed strictly inside the gate (a passing value is on the
    right side of its limit); otherwise an upper bound, as most gates are."""
    if figure in lower_bounds:
        return True
    value = number((base.get("figures") or {}).get(figure))
    return base.get("status") == "passed" and value is not None and value > limit


def compare_figures(name: str, base: dict[str, Any], head: dict[str, Any], factor: float,
                    lower_bounds: frozenset[str]) -> tuple[list[Move], list[Move]]:
    """(gated regressions, other moves) of one check's numeric scalar figures."""
    worse, moved = [], []
    head_figures, base_figures = head.get("figures") or {}, base.get("figures") or {}
    thresholds = {**(base.get("thresholds") or {}), **(head.get("thresholds") or {})}
    for figure in sorted(set(base_figures) & set(head_figures)):
        b, h = number(base_figures[figure]), number(head_figures[figure])
        if b is None or h is None:
            continue
        noise = _noise(base, head, figure)
        if not moved_beyond_noise(b, h, noise):
            continue
        limit = number(thresholds.get(figure))
        if limit is None:
            moved.append(Move(name, figure, b, h, noise))
            continue
        lower = is_lower_bound(figure, base, limit, lower_bounds)
        by = worse_factor(b, h, limit, lower, noise)
        move = Move(name, figure, b, h, noise, limit, lower, by if by > factor else None)
        (worse if by > factor else moved).append(move)
    return worse, moved


def diff(base: dict[str, dict[str, Any]], head: dict[str, dict[str, Any]], factor: float = DEFAULT_FACTOR) -> Diff:
    out = Diff()
    lower_bounds = _known_lower_bounds()
    for name in sorted(set(head) - set(base)):
        change = StatusChange(name, None, head[name]["status"], _first_line(head[name]))
        (out.new_failures if head[name]["status"] in BAD_STATUSES else out.added).append(change)
    for name in sorted(set(base) - set(head)):
        out.removed.append(StatusChange(name, base[name]["status"], None))
    for name in sorted(set(base) & set(head)):
        b, h = base[name], head[name]
        was_bad, is_bad = b["status"] in BAD_STATUSES, h["status"] in BAD_STATUSES
        if b["status"] != h["status"]:
            change = StatusChange(name, b["status"], h["status"], _first_line(h))
            if is_bad and not was_bad:
                out.new_failures.append(change)
            elif was_bad and not is_bad:
                out.fixed.append(change)
            else:
                out.other_status.append(change)
        worse, moved = compare_figures(name, b, h, factor, lower_bounds)
        out.worse += worse
        out.moved += moved
    return out


def _first_line(check: dict[str, Any]) -> str:
    message = check.get("message") or ""
    return message.splitlines()[0][:200] if message else ""


# ------------------------------------------------------------------------------------------
# writing


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _describe_move(m: Move) -> str:
    ratio = m.ratio
    change = f"x{ratio:.3g}" if math.isfinite(ratio) and ratio > 0 else f"{m.head - m.base:+.3g}"
    parts = [f"{m.figure} {_g(m.base)} -> {_g(m.head)} ({change}"]
    if m.limit is not None:
        parts.append(f", gate {'>=' if m.lower_bound else '<='} {_g(m.limit)}")
    parts.append(f", noise {_g(m.noise)}" if m.noise is not None else ", no noise floor recorded")
    if m.worse_by is not None:
        parts.append(f", {_g(m.worse_by)}x worse")
    return "".join(parts) + ")"


def _describe_status(s: StatusChange) -> str:
    move = f"{s.base or 'new'} -> {s.head or 'gone'}"
    return f"{s.check}: {move}" + (f": {s.message}" if s.message else "")


def text(d: Diff, base_label: str, head_label: str, factor: float) -> str:
    lines = [f"moe-conformance diff {base_label} -> {head_label} (factor {factor:g})",
             f"{d.regressions} regression(s): {len(d.new_failures)} new failure(s), "
             f"{len(d.worse)} gated figure(s) worse by > {factor:g}x; {len(d.fixed)} fixed, "
             f"{len(d.moved)} other figure(s) moved beyond noise, {len(d.added)} check(s) added, {len(d.removed)} removed"]
    sections = [
        ("NEW FAILURE", [_describe_status(s) for s in d.new_failures]),
        ("WORSE", [f"{m.check}: {_describe_move(m)}" for m in d.worse]),
        ("FIXED", [_describe_status(s) for s in d.fixed]),
        ("STATUS", [_describe_status(s) for s in d.other_status]),
        ("MOVED", [f"{m.check}: {_describe_move(m)}" for m in d.moved]),
        ("ADDED", [_describe_status(s) for s in d.added]),
        ("REMOVED", [_describe_status(s) for s in d.removed]),
    ]
    for label, items in sections:
        lines += [f"{label:<12} {item}" for item in items]
    return "\n".join(lines) + "\n"


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def markdown(d: Diff, base_label: str, head_label: str, factor: float) -> str:
    verdict = (f"**{d.regressions} regression(s)**" if d.regressions else "no regression")
    lines = [
        "## MoE conformance: changes in this PR",
        "",
        f"`{base_label}` -> `{head_label}`: {verdict}; {len(d.fixed)} fixed, {len(d.moved)} figure(s) moved "
        f"beyond noise, {len(d.added)} check(s) added, {len(d.removed)} removed (regression: a new failure, or a gated "
        f"figure worse by more than {factor:g}x beyond its noise).",
    ]
    lines += _status_table("New failures", d.new_failures)
    lines += _move_table(f"Gated figures worse by more than {factor:g}x", d.worse)
    lines += _status_table("Fixed", d.fixed)
    lines += _status_table("Other status changes", d.other_status)
    lines += _move_table("Figures moved beyond noise", d.moved)
    lines += _status_table("Checks added", d.added)
    lines += _status_table("Checks removed", d.removed)
    return "\n".join(lines) + "\n"


def _status_table(title: str, items: list[StatusChange]) -> list[str]:
    if not items:
        return []
    rows = [f"| `{_cell(s.check)}` | {s.base or 'new'} | {s.head or 'gone'} | {_cell(s.message)} |" for s in items]
    return ["", f"### {title} ({len(items)})", "", "| check | base | head | message |", "|---|---|---|---|", *rows]


def _move_table(title: str, moves: list[Move]) -> list[str]:
    if not moves:
        return []
    rows = []
    for m in moves:
        gate = f"{'>=' if m.lower_bound else '<='} {_g(m.limit)}" if m.limit is not None else ""
        ratio = m.ratio
        rows.append(f"| `{_cell(m.check)}` | {m.figure} | {_g(m.base)} | {_g(m.head)} | "
                    f"{'x' + format(ratio, '.3g') if math.isfinite(ratio) else 'from 0'} | {gate} | {_g(m.noise)} |")
    return ["", f"### {title} ({len(moves)})", "", "| check | figure | base | head | change | gate | noise |",
            "|---|---|---|---|---|---|---|", *rows]


# ------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-conformance diff",
                                description="What a PR changed in the conformance reports (see moe_conformance/diff.py).")
    p.add_argument("base", type=Path, help="the base commit's report JSON, or a folder of them")
    p.add_argument("head", type=Path, help="the head commit's report JSON, or a folder of them")
    p.add_argument("--factor", type=float, default=DEFAULT_FACTOR,
                   help="a gated figure worse by more than this factor beyond noise is a regression (default 2)")
    p.add_argument("--markdown", action="store_true", help="write Markdown for a PR comment")
    p.add_argument("--output", type=Path, default=None, help="write to this file instead of stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["diff"]:  # installed as `moe-conformance`, invoked as `moe-conformance diff ...`
        argv = argv[1:]
    args = _parser().parse_args(argv)
    if args.factor <= 1:
        print("moe-conformance diff: --factor must be > 1", file=sys.stderr)
        return 2
    try:
        base, head = read_checks(args.base), read_checks(args.head)
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"moe-conformance diff: {exc}", file=sys.stderr)
        return 2
    result = diff(base, head, args.factor)
    render = markdown if args.markdown else text
    out = render(result, str(args.base), str(args.head), args.factor)
    if args.output:
        args.output.write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
    return 1 if result.regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
