"""Measure the error floor of every kernel op per dtype against the fp64 references.

Runs the checks of moe_conformance.kernel_checks.checks with all gates lifted over several seeds
and shapes, and prints the worst scaled error (|got - fp64| / max|fp64|) per (op, dtype,
backend). The gates in checks.py are a small multiple of these floors.

    TRITON_INTERPRET=1 python benchmarks/kernel_noise_floor.py            # CPU: torch + triton fp32/fp16, torch bf16
    python benchmarks/kernel_noise_floor.py --device cuda                 # GPU: adds triton bf16
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import torch  # noqa: E402

from moe_conformance.kernel_checks import checks  # noqa: E402
from moe_conformance.kernel_checks.strategies import ExpertsCase, RouteCase, RoutingConfig  # noqa: E402


def cases(n_seeds: int):
    shapes = [(7, 19, 13, 6, 3, "random"), (12, 24, 20, 8, 2, "some_empty"),
              (5, 32, 16, 9, 8, "random"), (9, 17, 11, 5, 1, "all_on_one")]
    for seed in range(n_seeds):
        T, H, I, E, K, dist = shapes[seed % len(shapes)]
        yield ExpertsCase(T, H, I, E, K, dist, seed=seed)


def route_case_list(n_seeds: int):
    configs = [RoutingConfig("softmax", norm_topk_prob=False),
               RoutingConfig("softmax", norm_topk_prob=True),
               RoutingConfig("sigmoid", 4, 2, True, 2.5, True),
               RoutingConfig("sigmoid", 1, 1, True, 2.827, True)]
    for seed in range(n_seeds):
        cfg = configs[seed % len(configs)]
        yield RouteCase(12, 16 if cfg.n_group == 1 else 20, 4, cfg, seed=seed)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--backends", default="torch,triton")
    args = ap.parse_args()
    for key in checks.GATES:
        checks.GATES[key] = math.inf
    floors = defaultdict(float)
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for backend in args.backends.split(","):
        if not checks.backend_available(backend, args.device)[0]:
            print(f"skip {backend}: {checks.backend_available(backend, args.device)[1]}")
            continue
        for case in route_case_list(args.seeds):
            for ldt in (torch.float32, torch.bfloat16):
                r = checks.check_route(case, backend=backend, device=args.device, logits_dtype=ldt)
                floors[("route", "fp32 math", backend)] = max(floors[("route", "fp32 math", backend)], r["max_error"])
        for dtype in dtypes:
            ok, why = checks.backend_available(backend, args.device, dtype)
            if not ok:
                print(f"skip {backend} {dtype}: {why}")
                continue
            for case in cases(args.seeds):
                for op, fn in (("combine", checks.check_combine), ("experts", checks.check_experts)):
                    r = fn(case, backend=backend, dtype=dtype, device=args.device)
                    for tname, fig in r["tensors"].items():
                        key = (op, str(dtype).replace("torch.", ""), backend)
                        floors[key] = max(floors[key], fig["max_error"])
                        tkey = (f"{op}:{tname}", str(dtype).replace("torch.", ""), backend)
                        floors[tkey] = max(floors[tkey], fig["max_error"])
    print(f"\nnoise floor: max scaled error vs fp64 over {args.seeds} seeds, device={args.device}, "
          f"torch {torch.__version__}")
    print(f"{'op':<24}{'dtype':<12}{'backend':<10}{'floor':>10}")
    for (op, dtype, backend), v in sorted(floors.items()):
        print(f"{op:<24}{dtype:<12}{backend:<10}{v:>10.2e}")


if __name__ == "__main__":
    main()
