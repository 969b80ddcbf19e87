"""One self-contained HTML page per run: every arch's report, for a person to read.

``render(reports, images)`` returns the page: a summary table (arch x family x status), then per
arch its header (reference, candidate, versions, warnings) and per family one row per check
(status, key figures, thresholds, the first line of the message), the full failure diagnosis
(the check's message) unfolded under a failing check, and its curves. Nothing external: the CSS
is inline and each plot is an inline base64 PNG, so the file can be mailed, attached to a CI
run or opened from an artifact zip.

``images`` maps a check name to PNG bytes or a PNG path; ``moe_conformance.plots.render``
makes those from the checks' ``curves`` figures (:func:`plots_for` calls it).
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Status columns in reading order; statuses a report adds later are appended as they come.
STATUS_ORDER = ("failed", "error", "interrupted", "blocked", "passed", "xfailed", "not_applicable", "skipped")
BAD = frozenset({"failed", "error", "interrupted"})
KEY_FIGURES = 6  # scalar figures shown in a row; the rest are one click away

CSS = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 6px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; margin: 18px 0 6px; } .meta { color: #59636e; font-size: 12px; }
table { border-collapse: collapse; margin: 6px 0 12px; } th, td { border: 1px solid #d0d7de; padding: 4px 8px;
  text-align: left; vertical-align: top; } th { background: #f6f8fa; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } code { font-size: 12px; overflow-wrap: anywhere; }
table { max-width: 100%; } td { overflow-wrap: anywhere; }
.status { font-weight: 600; border-radius: 10px; padding: 1px 8px; white-space: nowrap; font-size: 12px; }
.s-passed { background: #dafbe1; color: #116329; }
.s-failed, .s-error, .s-interrupted { background: #ffebe9; color: #a40e26; }
.s-xfailed { background: #fff8c5; color: #7d4e00; }
.s-skipped, .s-not_applicable, .s-blocked { background: #eaeef2; color: #424a53; }
tr.bad td { background: #fff5f5; } .warn { background: #fff8c5; padding: 6px 10px; border-radius: 6px; }
pre.diag { white-space: pre-wrap; background: #f6f8fa; padding: 8px; border-radius: 6px; font-size: 12px;
  max-width: 1100px; }
figure { margin: 8px 0 16px; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-size: 12px; color: #59636e; } details summary { cursor: pointer; color: #0969da; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def _scalars(figures: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in figures.items() if not isinstance(v, (list, dict))]


def _anchor(*parts: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else "_" for ch in part) for part in parts)


def _statuses(reports: Iterable[dict[str, Any]]) -> list[str]:
    seen = {c["status"] for r in reports for c in r.get("checks", [])}
    return [s for s in STATUS_ORDER if s in seen] + sorted(seen - set(STATUS_ORDER))


def _families(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    # failures first within a family: what a reader came for
    for check in sorted(report.get("checks", []), key=lambda c: (c.get("family", ""), c["status"] not in BAD, c["name"])):
        out.setdefault(check.get("family", ""), []).append(check)
    return out


def _badge(status: str) -> str:
    return f'<span class="status s-{_e(status)}">{_e(status.replace("_", " "))}</span>'


def image_uri(image: bytes | Path | str) -> str:
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------------------------------
# page parts


def _summary(reports: list[dict[str, Any]], statuses: list[str]) -> list[str]:
    rows = ["<table><tr><th>arch</th><th>family</th>" + "".join(f"<th>{_badge(s)}</th>" for s in statuses) + "</tr>"]
    for report in reports:
        for family, checks in _families(report).items():
            counts = Counter(c["status"] for c in checks)
            bad = any(counts.get(s) for s in BAD)
            link = f'<a href="#{_anchor(report["arch"], family)}">{_e(family)}</a>'
            cells = "".join(f'<td class="n">{counts.get(s, "") or ""}</td>' for s in statuses)
            rows.append(f'<tr{" class=bad" if bad else ""}><td><a href="#{_anchor(report["arch"])}">{_e(report["arch"])}'
                        f"</a></td><td>{link}</td>{cells}</tr>")
    return [*rows, "</table>"]


def _header(report: dict[str, Any]) -> list[str]:
    env = report.get("environment") or {}
    versions = env.get("versions") or {}
    stack = ", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers", "triton") if versions.get(name))
    lines = [
        f'<h2 id="{_anchor(report["arch"])}">{_e(report["arch"])}</h2>',
        f'<div class="meta">reference <code>{_e(report.get("reference"))}</code> vs candidate '
        f'<code>{_e(report.get("candidate"))}</code><br>{_e(stack)}; device {_e(env.get("device"))}, seed '
        f'{_e(env.get("seed"))}; generated {_e(report.get("generated_at", ""))}</div>',
    ]
    lines += [f'<p class="warn">{_e(w)}</p>' for w in env.get("warnings") or []]
    lines += [f'<p class="warn">loosened gate: {_e(g)}</p>' for g in report.get("loosened_gates") or []]
    return lines


def _check_row(check: dict[str, Any]) -> list[str]:
    scalars = _scalars(check.get("figures") or {})
    shown = ", ".join(f"{_e(k)} = {_e(_fmt(v))}" for k, v in scalars[:KEY_FIGURES])
    if len(scalars) > KEY_FIGURES:
        rest = "<br>".join(f"{_e(k)} = {_e(_fmt(v))}" for k, v in scalars[KEY_FIGURES:])
        shown += f"<details><summary>{len(scalars) - KEY_FIGURES} more</summary>{rest}</details>"
    gates = ", ".join(f"{_e(k)}: {_e(_fmt(v))}" for k, v in (check.get("thresholds") or {}).items())
    message = check.get("message") or ""
    first = message.splitlines()[0] if message else ""
    bad = check["status"] in BAD
    diagnosis = (f'<details{" open" if bad else ""}><summary>diagnosis</summary><pre class="diag">{_e(message)}</pre>'
                 "</details>") if "\n" in message or (bad and message) else ""
    return [f'<tr{" class=bad" if bad else ""} id="{_anchor(check["name"])}"><td><code>{_e(check["name"])}</code></td>'
            f'<td>{_badge(check["status"])}</td><td>{shown}</td><td>{gates}</td>'
            f'<td class="n">{_e(_fmt(round(float(check.get("seconds") or 0), 2)))}</td><td>{_e(first)}{diagnosis}</td></tr>']


def _family_section(arch: str, family: str, checks: list[dict[str, Any]],
                    images: Mapping[str, bytes | Path | str]) -> list[str]:
    lines = [f'<h3 id="{_anchor(arch, family)}">{_e(family)}</h3>',
             "<table><tr><th>check</th><th>status</th><th>key figures</th><th>thresholds</th><th>s</th>"
             "<th>message</th></tr>"]
    for check in checks:
        lines += _check_row(check)
    lines.append("</table>")
    for check in checks:
        if check["name"] in images:
            lines.append(f'<figure><img alt="{_e(check["name"])}" src="{image_uri(images[check["name"]])}">'
                         f"<figcaption>{_e(check['name'])}</figcaption></figure>")
    return lines


def render(reports: list[dict[str, Any]], images: Mapping[str, bytes | Path | str] | None = None,
           title: str = "MoE conformance report") -> str:
    """The page for one run (``reports``: the JSON reports of its archs)."""
    images = images or {}
    reports = sorted(reports, key=lambda r: r.get("arch", ""))
    statuses = _statuses(reports)
    total = Counter(c["status"] for r in reports for c in r.get("checks", []))
    verdict = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(total.items(), key=lambda kv: statuses.index(kv[0])))
    body = [f"<h1>{_e(title)}</h1>", f'<div class="meta">{len(reports)} arch(s): {_e(verdict)}</div>',
            *_summary(reports, statuses)]
    for report in reports:
        body += _header(report)
        for family, checks in _families(report).items():
            body += _family_section(report["arch"], family, checks, images)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------------
# writing


def plots_for(report_dir: Path, reports: Iterable[dict[str, Any]]) -> dict[str, Path]:
    """The PNGs of every check's curves, drawn by moe_conformance.plots (check name -> path)."""
    from . import plots

    out: dict[str, Path] = {}
    for report in reports:
        out.update(plots.render(Path(report_dir), report))
    return out


def write(report_dir: Path, reports: list[dict[str, Any]], images: Mapping[str, bytes | Path | str] | None = None,
          name: str = "index.html") -> Path:
    """``<report_dir>/index.html``, atomically; plots are drawn when ``images`` is not given."""
    from .report import write_atomic

    report_dir = Path(report_dir)
    if images is None:
        images = plots_for(report_dir, reports)
    path = report_dir / name
    write_atomic(path, render(reports, images))
    return path
