"""How long `pytest --arch NAME` takes, and how much memory, per arch and per check family.

Run it on a fresh clone after `bash scripts/bootstrap.sh` (cold caches are part of the figure):

    .venv/bin/python benchmarks/suite_timing.py                  # kimi_k25 and glm4_moe
    .venv/bin/python benchmarks/suite_timing.py --arch all -n 2  # every arch, in one xdist run

Each arch runs in a fresh process (imports included, as a user's CI would pay them). Prints a
Markdown table: wall seconds and peak RSS of the whole run, then seconds per family (summed
setup+call+teardown durations from the report, so model building lands in the family that
first needs it), and the line count of each arch plugin (plugins should stay declarations); with
vLLM on, per arch the vLLM worker's cold starts, engine builds and seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run pytest in-process in a child and report the child's own peak RSS (and its workers').
RUNNER = (
    "import resource, sys, pytest\n"
    "rc = pytest.main(sys.argv[1:])\n"
    "peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "print(f'PEAK_RSS_KIB={peak}')\n"
    "sys.exit(int(rc))\n"
)


def run(arch: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", RUNNER, "--arch", arch, "-q", "-p", "no:cacheprovider", "--report-dir", tmp, *extra],
            cwd=REPO, capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
        peak = int(out.stdout.rsplit("PEAK_RSS_KIB=", 1)[1].split()[0]) if "PEAK_RSS_KIB=" in out.stdout else -1
        reports = {p.stem: json.loads(p.read_text()) for p in Path(tmp).glob("*.json")}
    summary = out.stdout.strip().splitlines()[-2] if out.stdout.strip() else out.stderr[-500:]
    return {"wall": wall, "peak_mib": peak / 1024, "rc": out.returncode, "reports": reports, "summary": summary}


def family_seconds(report: dict) -> dict[str, float]:
    out = defaultdict(float)
    for check in report["checks"]:
        out[check["family"]] += check["seconds"]
    return dict(sorted(out.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="kimi_k25,glm4_moe", help="comma-separated archs, each run alone; or 'all' (one run)")
    parser.add_argument("-n", default=None, help="pytest-xdist workers for the run")
    args = parser.parse_args()
    extra = ["-n", args.n] if args.n else []
    runs = [args.arch] if args.arch == "all" else args.arch.split(",")

    print("| run | wall s | peak RSS MiB | result |")
    print("|---|---|---|---|")
    results = {}
    for arch in runs:
        r = run(arch, extra)
        results[arch] = r
        print(f"| `pytest --arch {arch}{' -n ' + args.n if args.n else ''}` | {r['wall']:.1f} | {r['peak_mib']:.0f} | {r['summary']} |")

    families = sorted({f for r in results.values() for rep in r["reports"].values() for f in family_seconds(rep)})
    print("\n| arch | " + " | ".join(families) + " | plugin lines |")
    print("|---|" + "---|" * (len(families) + 1))
    for r in results.values():
        for arch, rep in sorted(r["reports"].items()):
            secs = family_seconds(rep)
            plugin = REPO / "archs" / f"{arch}.py"
            lines = sum(1 for _ in plugin.open()) if plugin.exists() else "-"
            print(f"| {arch} | " + " | ".join(f"{secs.get(f, 0):.1f}" for f in families) + f" | {lines} |")
    vllm = {arch: calls for r in results.values() for arch, rep in sorted(r["reports"].items())
            if (calls := vllm_calls(rep))}
    if vllm:
        print("\n| arch | vLLM worker cold starts | vLLM engine builds | vLLM seconds (wall, summed) |")
        print("|---|---|---|---|")
        for arch, calls in vllm.items():
            print(f"| {arch} | {sum(1 for c in calls if c.get('import', 0) > 0)} | "
                  f"{sum(1 for c in calls if c.get('start', 0) > 0)} | {sum(c.get('wall', 0) for c in calls):.1f} |")
    sys.exit(max(r["rc"] for r in results.values()))


def vllm_calls(report: dict) -> list[dict]:
    """The vLLM worker calls the report's checks recorded (``vllm_call_seconds`` figures: import, engine
    build and request seconds, wall), each once."""
    return [c for check in report["checks"] for c in (check.get("figures") or {}).get("vllm_call_seconds") or []]


if __name__ == "__main__":
    main()
