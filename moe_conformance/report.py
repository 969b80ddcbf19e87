"""Compliance reports: ``<dir>/<arch>.json`` (schema-versioned, for machines) and
``<dir>/<arch>.md`` (a table for a PR comment). Written by the controlling process only,
atomically (temp file in the same folder, then rename), so a crashed or parallel run never
leaves a half-written report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from collections import Counter, defaultdict
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from . import support

SCHEMA_VERSION = 2
# a check's status: from pytest's outcome of its phases; "not_applicable" and "blocked" are
# pytest skips with a declared reason, "interrupted" a check that never finished
STATUSES = ("passed", "failed", "error", "interrupted", "blocked", "not_applicable", "skipped", "xfailed", "xpassed")
LOOSENED_FACTOR = 10.0


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in ("torch", "transformers", "triton", "safetensors", "pytest", "hypothesis", "moe-conformance", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def environment(device: str, seed: int) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "seed": seed,
        "versions": package_versions(),
        "tested_range": {"transformers": list(support.TESTED_TRANSFORMERS), "torch": list(support.TESTED_TORCH)},
        "warnings": support.warnings(),
    }


def write_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w", **({} if isinstance(text, bytes) else {"encoding": "utf-8"})) as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable by others like any file the user writes (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no NaN/inf
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def build(arch: str, header: dict[str, Any], checks: list[dict[str, Any]]) -> dict[str, Any]:
    checks = sorted(checks, key=lambda c: (c["family"], c["name"]))
    of_candidate = [c for c in checks if c.get("subject", "candidate") == "candidate"]
    return _jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "arch": arch,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **header,
            "summary": dict(Counter(c["status"] for c in checks)),
            # the conformance verdict on the candidate: checks of transformers itself or of kernels
            # are reported but not counted here
            "candidate_summary": dict(Counter(c["status"] for c in of_candidate)),
            "checks": checks,
        }
    )


def loosened_gates(spec) -> list[str]:
    """Tolerance overrides of a plugin looser than the profile's gate by more than 10x: shown in
    the header and the Markdown, with the factor (a 1e9 override must not pass unseen)."""
    from . import tolerances

    out = []
    for key, value in sorted(dict(spec.tolerances).items()):
        check, _, figure = key.partition(".")
        base = tolerances.PROFILES.get((check, "float32"))
        gate = base.gates.get(figure) if base else None
        if gate is None:
            out.append(f"{key} = {value:g}: no such gate in the {check!r} profile (ignored)")
            continue
        factor = (gate.limit / value if value else math.inf) if gate.at_least else (value / gate.limit if gate.limit else math.inf)
        if factor > LOOSENED_FACTOR:
            op = ">=" if gate.at_least else "<="
            out.append(f"{key}: {op} {value:g} instead of {op} {gate.limit:g} ({factor:.3g}x looser than the measured profile)")
    return out


def root_causes(records: list[dict[str, Any]]) -> list[str]:
    """One line per root cause: checks blocked by a broken contract item, and failures that
    share a case's first divergence, grouped under it."""
    groups: dict[str, list[str]] = defaultdict(list)
    for r in records:
        cause = r.get("root_cause")
        if cause and r["status"] in ("blocked", "failed", "error"):
            groups[cause].append(r["name"])
    lines = []
    for cause, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"root cause: {cause}")
        lines.append(f"  -> {len(names)} check(s): {', '.join(sorted(names)[:6])}{' ...' if len(names) > 6 else ''}")
    return lines


def family_counts(checks: list[dict[str, Any]]) -> dict[str, Counter]:
    out: dict[str, Counter] = defaultdict(Counter)
    for c in checks:
        out[c["family"]][c["status"]] += 1
    return dict(sorted(out.items()))


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any], plots: dict[str, Path] | None = None, base: Path | None = None) -> str:
    env = report["environment"]["versions"]
    lines = [
        f"## MoE conformance: `{report['arch']}`",
        "",
        f"reference `{report['reference']}` vs candidate `{report['candidate']}`  ",
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, triton {env.get('triton')}, "
        f"device {report['environment']['device']}, seed {report['environment']['seed']}",
        *[f"\n**Warning:** {w}" for w in report["environment"].get("warnings", [])],
        "",
        "| family | " + " | ".join(STATUSES) + " |",
        "|---|" + "---|" * len(STATUSES),
    ]
    for family, counts in family_counts(report["checks"]).items():
        lines.append(f"| {family} | " + " | ".join(str(counts.get(s, 0) or "") for s in STATUSES) + " |")
    run = report.get("run") or {}
    if run.get("status") and run["status"] != "complete":
        lines[2:2] = [f"**{run['status'].upper()} RUN** ({run.get('interrupted_by') or 'a filtered selection'}): "
                      f"not every check ran; the complete report is `{report['arch']}.json`", ""]
    if report.get("loosened_gates"):
        lines += ["", "**Loosened gates** (plugin overrides > 10x the measured profile):", ""]
        lines += [f"- {g}" for g in report["loosened_gates"]]
    lines += ["", "| check | status | key figures | message |", "|---|---|---|---|"]
    # checks of transformers itself or of kernels are listed, marked: they are not the candidate's verdict
    for c in report["checks"]:
        scalars = [(k, v) for k, v in c["figures"].items() if not isinstance(v, (list, dict))]  # curves go to plots
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in scalars[:4])
        message = (c["message"] or "").splitlines()[0][:160] if c["message"] else ""
        icon = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "interrupted": "**INTERRUPTED**"}.get(
            c["status"], c["status"].replace("_", " "))
        subject = c.get("subject", "candidate")
        name = c["name"] + ("" if subject == "candidate" else f" ({subject})")
        lines.append(f"| `{name}` | {icon} | {figures} | {message.replace('|', '/')} |")
    if plots:
        lines += ["", "### Plots", ""]
        for name, path in plots.items():
            rel = path.relative_to(base).as_posix() if base else path.as_posix()
            lines += [f"`{name}`", "", f"![{name}]({rel})", ""]
    return "\n".join(lines) + "\n"


def write(report_dir: Path, report: dict[str, Any], partial: bool = False) -> tuple[list[Path], dict[str, Path]]:
    """``<arch>.json`` and ``.md`` (+ plots) for a complete run; a filtered or interrupted run
    writes ``<arch>.partial.*`` instead and leaves the last complete report in place. Returns
    the report files and the plots by check name."""
    arch = report["arch"]
    stem = f"{arch}.partial" if partial else arch
    json_path, md_path = report_dir / f"{stem}.json", report_dir / f"{stem}.md"
    write_atomic(json_path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    from . import plots as plotting

    try:
        images = plotting.render(report_dir, report)
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not cost the report
        images = {}
        report = {**report, "plot_error": f"{type(exc).__name__}: {exc}"}
    write_atomic(md_path, markdown(report, images, report_dir))
    return [json_path, md_path], images
