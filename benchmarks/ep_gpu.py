"""The expert_parallel family on GPUs: NCCL, one GPU per rank, world sizes 1..N.

Runs ``pytest --arch ARCHS --family expert_parallel --device cuda`` once per seed with
``MOE_CONFORMANCE_EP_WORLD_SIZES=1,...,N`` (N: the visible GPUs, or --max-ranks), then prints
per world size the worst figure of each kind against its gate, with the family's wall time.
NVLink multicast stays off in every process (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1), the launcher's children included.

    python benchmarks/ep_gpu.py                          # every GPU, kimi_k25, seed 0
    python benchmarks/ep_gpu.py --arch kimi_k25,mixtral --seeds 3 --out results/
    python benchmarks/ep_gpu.py --device cpu --max-ranks 4 --seeds 5 --arch all   # the gloo floor

Without a GPU (and without --device cpu) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NO_MULTICAST)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="kimi_k25", help="arch(s): a name, 'a,b' or 'all' (default kimi_k25)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--max-ranks", type=int, default=0, help="largest world size (default: every visible GPU)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default=os.environ.get("OUT", "ep_gpu_out"), help="report folder")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and gpus == 0:
        print("ep_gpu: skipped: no CUDA device visible (run on a GPU host, or --device cpu for the gloo path)")
        return 0
    n = args.max_ranks or (gpus if args.device == "cuda" else 4)
    if args.device == "cuda" and n > gpus:
        print(f"ep_gpu: --max-ranks {n} > {gpus} visible GPUs (one GPU per rank)")
        return 2
    sizes = ",".join(str(w) for w in range(1, n + 1))
    from importlib.metadata import entry_points

    installed = any(ep.name == "moe_conformance" for ep in entry_points(group="pytest11"))
    plugin = [] if installed else ["-p", "moe_conformance.pytest_plugin"]  # a bare checkout on a GPU host
    out = Path(args.out)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **NO_MULTICAST, "MOE_CONFORMANCE_EP_WORLD_SIZES": sizes, "PYTHONPATH": path}
    worst: dict[tuple[str, int], dict] = {}
    failures, started = [], time.time()
    for seed in range(args.seeds):
        folder = out / f"seed{seed}"
        cmd = [sys.executable, "-m", "pytest", *plugin, "--arch", args.arch, "--family", "expert_parallel", "--device", args.device,
               "--seed", str(seed), "--report-dir", str(folder), "-q", "-p", "no:cacheprovider"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        print(f"seed {seed}: pytest exit {proc.returncode} in {time.time() - t0:.1f} s ({proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ''})")
        if proc.returncode not in (0, 1) or not list(folder.glob("*.json")):
            print((proc.stdout + proc.stderr)[-4000:])
            failures.append(f"seed {seed}: pytest exited {proc.returncode} with no report")
        for path in sorted(folder.glob("*.json")):
            report = json.loads(path.read_text())
            for check in report["checks"]:
                w = int(check["name"].rsplit("-", 1)[-1].removesuffix("ranks]"))
                if check["status"] not in ("passed", "not_applicable"):
                    failures.append(f"seed {seed} {check['name']}: {check['status']}: {check['message'][:300]}")
                for k, v in check["figures"].items():
                    if isinstance(v, (int, float)) and k != "launch_seconds":
                        entry = worst.setdefault((k, w), {"value": v, "gate": check["thresholds"].get(k), "where": ""})
                        if v >= entry["value"]:
                            entry.update(value=v, where=f"{report['arch']} seed {seed}")
    print(f"\n{args.device}, world sizes {sizes}, {args.seeds} seed(s), {time.time() - started:.0f} s")
    print(f"{'figure':<48} {'ranks':>5} {'worst':>11} {'gate':>9}  where")
    for (k, w), e in sorted(worst.items()):
        gate = "" if e["gate"] is None else f"{e['gate']:.3g}"
        print(f"{k:<48} {w:>5} {e['value']:>11.3g} {gate:>9}  {e['where']}")
    for line in failures:
        print("FAILED", line)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ep_gpu_summary.json").write_text(json.dumps(
        {"device": args.device, "world_sizes": sizes, "seeds": args.seeds, "failures": failures,
         "worst": [{"figure": k, "ranks": w, **e} for (k, w), e in sorted(worst.items())]}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
