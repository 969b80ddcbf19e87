"""False failures of unchanged built-ins copied under other names, across seeds.

A team's first plugin is often a built-in copied under its own name. Such a copy must pass like
the original, whatever the seed: no check may depend on the arch's name, and no routing
near-tie may turn float noise into a failure. This runs every built-in arch renamed
(``copy<seed>_<arch>``) at seeds 0..N-1 through the core families and counts failures.

    .venv/bin/python benchmarks/renamed_copies.py --copies 100        # prints a table

Not a timed test: ~2 minutes per seed (11 archs) on 2 cores with -n 2.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAMILIES = "contract,tiny_config,logit_parity,roundtrip,router_grad"
PLUGIN = """
import dataclasses
from moe_conformance.registry import builtin_entries
ARCHS = [dataclasses.replace(e.load(), name=f"copy{SEED}_{e.name}") for e in builtin_entries() if e.name in NAMES]
"""


def run_seed(seed: int, names: list[str], workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        plugin = Path(tmp) / f"copies_{seed}.py"
        plugin.write_text(f"SEED = {seed}\nNAMES = {names!r}\n" + PLUGIN)
        cmd = [sys.executable, "-m", "pytest", "--arch-plugin", str(plugin), "--seed", str(seed), "--family", FAMILIES,
               "-q", "-p", "no:cacheprovider", "--report-dir", str(Path(tmp) / "reports"), "-n", str(workers)]
        subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        failures = []
        checks = 0
        for path in (Path(tmp) / "reports").glob("*.json"):
            report = json.loads(path.read_text())
            for c in report["checks"]:
                checks += 1
                if c["status"] in ("failed", "error", "interrupted"):
                    failures.append(f"{c['name']}: {c['message'].splitlines()[0][:160] if c['message'] else ''}")
        return {"seed": seed, "copies": len(names), "checks": checks, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=100)
    parser.add_argument("-n", "--workers", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from moe_conformance.registry import builtin_entries

    names = [e.name for e in builtin_entries()]
    rows, done, seed = [], 0, 0
    while done < args.copies:
        take = names[: min(len(names), args.copies - done)]
        rows.append(run_seed(seed, take, args.workers))
        done += len(take)
        seed += 1
    print("| seed | copies | checks | false failures |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['copies']} | {r['checks']} | {len(r['failures'])} |")
    total = sum(len(r["failures"]) for r in rows)
    print(f"\n{done} renamed copies over {len(rows)} seeds, {sum(r['checks'] for r in rows)} checks: "
          f"{total} false failure(s)")
    for r in rows:
        for f in r["failures"]:
            print(f"- seed {r['seed']}: {f}")


if __name__ == "__main__":
    main()
