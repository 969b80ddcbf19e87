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

SCHEMA_VERSION = 1
STATUSES = ("passed", "failed", "error", "skipped", "xfailed")


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


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
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
    return _jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "arch": arch,
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **header,
            "summary": dict(Counter(c["status"] for c in checks)),
            "checks": checks,
        }
    )


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
    lines += ["", "| check | status | key figures | message |", "|---|---|---|---|"]
    for c in report["checks"]:
        scalars = [(k, v) for k, v in c["figures"].items() if not isinstance(v, (list, dict))]  # curves go to plots
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in scalars[:4])
        message = (c["message"] or "").splitlines()[0][:160] if c["message"] else ""
        icon = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**"}.get(c["status"], c["status"])
        lines.append(f"| `{c['name']}` | {icon} | {figures} | {message.replace('|', '/')} |")
    if plots:
        lines += ["", "### Plots", ""]
        for name, path in plots.items():
            rel = path.relative_to(base).as_posix() if base else path.as_posix()
            lines += [f"`{name}`", "", f"![{name}]({rel})", ""]
    return "\n".join(lines) + "\n"


def write(report_dir: Path, report: dict[str, Any]) -> list[Path]:
    arch = report["arch"]
    json_path, md_path = report_dir / f"{arch}.json", report_dir / f"{arch}.md"
    write_atomic(json_path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    from . import plots as plotting

    try:
        images = plotting.render(report_dir, report)
    except Exception as exc:  # noqa: BLE001 - a plotting failure must not cost the report
        images = {}
        report = {**report, "plot_error": f"{type(exc).__name__}: {exc}"}
    write_atomic(md_path, markdown(report, images, report_dir))
    return [json_path, md_path, *images.values()]
