"""PNG plots of the curves checks record, rendered by the controlling process when it writes
the reports (workers only ship numbers in the check figures).

A check opts in with a ``curves`` figure::

    {"title": "...", "panels": {panel: {series: [y per step]}}, "log_panels": [panel, ...]}

Each such check becomes ``<report_dir>/<arch>/<check name>.png``, one subplot per panel.
matplotlib is imported only here and only when there is something to draw, so the pytest
plugin stays light.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any


def plot_name(check_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", check_name).strip("_") + ".png"


def curves_of(check: dict[str, Any]) -> dict[str, Any] | None:
    curves = (check.get("figures") or {}).get("curves")
    if isinstance(curves, dict) and isinstance(curves.get("panels"), dict) and curves["panels"]:
        return curves
    return None


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan  # "nan"/"inf" strings from the JSON report, or junk


def render(report_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Draw every check's curves; returns check name -> PNG path. Written atomically."""
    todo = [(c["name"], curves_of(c)) for c in report["checks"]]
    todo = [(name, curves) for name, curves in todo if curves]
    if not todo:
        return {}
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    folder = Path(report_dir) / report["arch"]
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, curves in todo:
        panels = curves["panels"]
        log_panels = set(curves.get("log_panels", ()))
        width, height = 4.2 * len(panels), 3.2
        fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
        # fixed margins, in inches: tight_layout drew every figure twice (half of a run's report time)
        fig.subplots_adjust(left=0.55 / width, right=1 - 0.15 / width, bottom=0.45 / height, top=1 - 0.6 / height,
                            wspace=0.3)
        for ax, (panel, series) in zip(axes[0], panels.items()):
            floor = 1e-9  # log panels: exact zeros are drawn at the floor
            for label, ys in series.items():
                ys = [_number(y) for y in ys]
                if panel in log_panels:
                    ys = [max(y, floor) if math.isfinite(y) else y for y in ys]
                style = {"linestyle": "--", "color": "grey", "linewidth": 0.8} if label.startswith("healthy") else {}
                if label == "reference":  # drawn wide and pale so an identical candidate stays visible on top
                    style = {"linewidth": 3.0, "alpha": 0.45}
                elif label == "candidate":
                    style = {"linestyle": "--", "linewidth": 1.2}
                ax.plot(range(len(ys)), ys, label=label, **style)
            if panel in log_panels:
                ax.set_yscale("log")
            ax.set_title(panel + (f" (0 drawn at {floor:g})" if panel in log_panels else ""), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        fig.suptitle(curves.get("title", name), fontsize=10)
        path = folder / plot_name(name)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp.png")
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=90)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; plots are read by others like the report
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)
        written[name] = path
    return written
