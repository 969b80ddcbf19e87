"""MoE layer benchmark on a GPU: Triton kernels vs torch._grouped_mm vs a per-expert loop.

Whole layer = router matmul + routing (top-k, group-limited for DeepSeek) + permutation +
gate/up/SwiGLU/down expert GEMMs + weighted top-k combine; forward, and forward+backward
(gradients for x, the router and all expert weights). bf16 everywhere, router math in fp32.

One run does everything the report needs, so it fits one lease of the GPU machine:
  1. environment + the bf16 matmul peak measured here (8192^3 torch.matmul);
  2. per layer shape: correctness (each implementation vs an fp32 per-expert reference, forward
     and gradients, in this same run), then timings (median of CUDA-event timings);
  3. the kernel conformance checks natively on the GPU (bf16, fp16, fp32) and the bf16 noise
     floor of the Triton kernels.
Results: $OUT (or --out) gets gpu_moe_layer.{md,json}, gpu_kernel_checks.{md,json}, log.
With --breakdown the run first times each Triton kernel of the layer alone (forward and backward, a
few block shapes / weight-gradient paths per kind, each checked against the default) into
breakdown.{md,json}; the report's 'bound' column then names the largest kernels. With --pick-defaults
too, each kind's variant fastest across the shapes becomes the default for the rest of the run (preset A
and the checks); the picks are logged and saved, to be written into triton_moe.py's tables.

    python benchmarks/gpu_moe_layer.py                 # on the GPU machine
    TRITON_INTERPRET=1 python benchmarks/gpu_moe_layer.py --smoke   # CPU dry run of the script

Implementations timed:
  triton      route + permute + experts + combine from moe_conformance/native/kernels/triton_moe.py
              (block shapes picked per layer shape from a few presets, like an autotuner);
  grouped_mm  the "torch" backend: torch routing, argsort permutation, torch._grouped_mm;
  loop        eager-style bf16 loop over experts (index, 3 matmuls, index_add), transformers'
              eager experts in spirit; few repetitions (it syncs the host once per call).
  ceiling     torch._grouped_mm alone on tokens already permuted by expert (gate, up, SwiGLU,
              down; no router, no permutation, no combine): what the expert GEMMs cost, the bound
              a whole layer can approach. Every layer figure is also printed as a ratio to it.

Speed goal (issue 12): triton >= 1.0x the grouped_mm layer on every shape and direction, and
forward >= 60% of the measured peak at 16k tokens; the report says, per shape, whether it is met.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moe_conformance.native import kernels  # noqa: E402
from moe_conformance.kernel_checks.reference import experts_reference  # noqa: E402

LAYERS = {
    "qwen3-30b-a3b": dict(H=2048, I=768, E=128, K=8, bias=False,
                          routing=dict(scoring="softmax", norm_topk_prob=True)),
    "deepseek-v3": dict(H=7168, I=2048, E=256, K=8, bias=True,
                        routing=dict(scoring="sigmoid", n_group=8, topk_group=4,
                                      norm_topk_prob=True, routed_scaling_factor=2.5)),
}
SMOKE_LAYERS = {
    "qwen-tiny": dict(H=32, I=24, E=8, K=2, bias=False, routing=dict(scoring="softmax", norm_topk_prob=True)),
    "deepseek-tiny": dict(H=48, I=32, E=16, K=4, bias=True,
                          routing=dict(scoring="sigmoid", n_group=4, topk_group=2,
                                       norm_topk_prob=True, routed_scaling_factor=2.5)),
}

# Block-shape presets for the Triton GEMM kinds; the best preset per layer shape (forward+backward
# time) is reported, like an autotuner would pick. "A" is the module's own defaults (triton_moe's
# GPU_CONFIG* tables, chosen from the --breakdown timings); the others override some kinds.
CFG_NAMES = {"rows": "GPU_CONFIG", "gate_up": "GPU_CONFIG_GATE_UP", "dgrad_act": "GPU_CONFIG_DGRAD_ACT",
             "dgrad_x": "GPU_CONFIG_DGRAD_X", "wgrad": "GPU_CONFIG_WGRAD"}


def _c(bm, bn, bk, w, st, **kw):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, **kw)


# Module-level switches of the weight gradients a preset or breakdown variant may set (besides
# the block-shape tables above): backend, gate/up as two launches, torch._grouped_mm orientation,
# operands gathered into sorted order before the Triton kernel.
WGRAD_KNOBS = ("WGRAD", "WGRAD_SPLIT_DUAL", "WGRAD_GROUPED_T", "WGRAD_PRESORT")
PRESET_NOTES = {
    "A": "the module's defaults",
    "B": "A with the d act GEMM 3 stages deep",
    "C": "A with every weight gradient on torch._grouped_mm as dW = (X^T G)^T",
    "S": "A with the Triton gate/up weight gradients as two launches",
    "O": "the block shapes and weight-gradient switches the module had before this run's change",
    "P": "every weight gradient on Triton, gate/up as two launches, operands gathered into sorted order first",
    "T": "per shape, the fastest variant of each kind in this run's breakdown",
}
PRESETS = {
    "A": {},
    # the d act GEMM pipelined 3 deep instead of 4 (3 was faster on DeepSeek-V3 at 16k tokens)
    "B": {"dgrad_act": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)},
    # every weight gradient on torch._grouped_mm in the orientation of its own autograd, dW = (X^T G)^T
    "C": {"knobs": dict(WGRAD="grouped_mm", WGRAD_GROUPED_T=True)},
    "S": {"knobs": dict(WGRAD_SPLIT_DUAL=True)},
    # the defaults before the permutation/weight-gradient rework (2026-12-02 13:33 run), for comparison
    "O": {"rows": _c(128, 256, 64, 8, 3, GROUP_M=8), "gate_up": _c(128, 64, 64, 8, 3, GROUP_M=8),
          "dgrad_act": _c(128, 128, 64, 8, 4, GROUP_M=8), "dgrad_x": _c(128, 256, 64, 8, 3, GROUP_M=8, SPLIT_DUAL=True),
          "wgrad": _c(64, 128, 128, 8, 3),
          "knobs": dict(WGRAD="auto", WGRAD_SPLIT_DUAL=False, WGRAD_GROUPED_T=False, WGRAD_PRESORT=False)},
    "P": {"knobs": dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=True)},
}

LOG: list[str] = []


def log(msg: str):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


# ------------------------------------------------------------------------------ timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, *, warmup=3, reps=10):
    """Median milliseconds of fn() over reps, CUDA events on a GPU, after warmup calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def matmul_peak(device):
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms, _ = time_ms(lambda: a @ b, device, warmup=5, reps=20)
    return 2 * n ** 3 / ms / 1e9


# ------------------------------------------------------------------------------- layer


class Layer:
    def __init__(self, spec, T, device, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        H, I, E = spec["H"], spec["I"], spec["E"]
        self.spec, self.T = spec, T

        def rnd(*shape, std):
            # generate in chunks on the CPU generator would be slow for 22 GB; use device RNG
            return (torch.randn(*shape, device=device, dtype=torch.float32) * std).to(dtype)

        torch.manual_seed(seed)
        self.x = rnd(T, H, std=1.0)
        self.router = rnd(E, H, std=H ** -0.5 * 3).requires_grad_()  # peaky routing
        self.bias = (torch.randn(E, generator=g) * 0.05 + 1.0).to(device) if spec["bias"] else None
        self.w_gate = rnd(E, I, H, std=H ** -0.5).requires_grad_()
        self.w_up = rnd(E, I, H, std=H ** -0.5).requires_grad_()
        self.w_down = rnd(E, H, I, std=I ** -0.5).requires_grad_()
        self.grad_out = rnd(T, H, std=1.0)
        self.params = [self.router, self.w_gate, self.w_up, self.w_down]

    def route(self, x, backend):
        logits = F.linear(x, self.router)  # bf16 matmul; routing math itself runs in fp32
        return kernels.route(logits, top_k=self.spec["K"], correction_bias=self.bias,
                             backend=backend, **self.spec["routing"])

    def forward(self, impl, x):
        if impl == "loop":
            w, idx = self.route(x, "torch")
            return loop_experts(x, idx, w, self.w_gate, self.w_up, self.w_down)
        backend = "triton" if impl == "triton" else "torch"
        w, idx = self.route(x, backend)
        return kernels.moe_experts(x, idx, w, self.w_gate, self.w_up, self.w_down, backend=backend)

    def zero_grad(self):
        for p in self.params:
            p.grad = None
        if self.x.grad is not None:
            self.x.grad = None

    def flops(self, backward: bool):
        s = self.spec
        fwd = 6 * self.T * s["K"] * s["H"] * s["I"] + 2 * self.T * s["H"] * s["E"]
        return 3 * fwd if backward else fwd


def loop_experts(x, idx, w, w_gate, w_up, w_down):
    """Eager-style bf16 loop over experts (one host sync for the counts)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    counts = torch.bincount(idx.reshape(-1), minlength=w_gate.shape[0]).tolist()
    for e, c in enumerate(counts):
        if c == 0:
            continue
        tok, k = torch.where(idx == e)
        h = x[tok]
        y = (F.silu(h @ w_gate[e].T) * (h @ w_up[e].T)) @ w_down[e].T
        out.index_add_(0, tok, y.float() * w[tok, k, None])
    return out.to(x.dtype)


def ceiling_inputs(layer: Layer):
    """Tokens sorted by expert once, outside the timing, with the layer's own routing."""
    from moe_conformance.native.kernels.torch_backend import permute_torch

    with torch.no_grad():
        _, idx = layer.route(layer.x, "torch")
        perm = permute_torch(idx, layer.spec["E"])
        x_sorted = layer.x[perm.sorted_slots // layer.spec["K"]].contiguous()
    grad = torch.randn_like(x_sorted)
    return x_sorted, perm.offsets, grad


def ceiling_experts(layer: Layer, x_sorted, offsets):
    from moe_conformance.native.kernels.torch_backend import _grouped_linear

    gate = _grouped_linear(x_sorted, layer.w_gate, offsets)
    up = _grouped_linear(x_sorted, layer.w_up, offsets)
    return _grouped_linear(F.silu(gate) * up, layer.w_down, offsets)


def bench_ceiling(layer: Layer, device, reps, warmup):
    x_sorted, offsets, grad = ceiling_inputs(layer)
    xg = x_sorted.detach().clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            ceiling_experts(layer, x_sorted, offsets)

    def fwd_bwd():
        layer.zero_grad()
        xg.grad = None
        ceiling_experts(layer, xg, offsets).backward(grad)

    f_ms, _ = time_ms(fwd, device, warmup=warmup, reps=reps)
    fb_ms, _ = time_ms(fwd_bwd, device, warmup=warmup, reps=reps)
    layer.zero_grad()
    return f_ms, fb_ms


# ------------------------------------------------------------------------- correctness


def scaled(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check_layer(layer: Layer, impls, device):
    """Each implementation vs an fp32 per-expert reference, forward and all gradients.

    Routing is fixed (torch routing) for the experts comparison so all see the same experts;
    the Triton router is compared with the torch router separately. The fp32 reference
    gradients are computed one expert at a time so no fp32 copy of all weights is needed.
    """
    res = {}
    x = layer.x
    with torch.no_grad():
        logits = F.linear(x, layer.router)
        kw = dict(top_k=layer.spec["K"], correction_bias=layer.bias, **layer.spec["routing"])
        w_t, i_t = kernels.route(logits, backend="torch", **kw)
        with kernels.poisoned_outputs():
            w_k, i_k = kernels.route(logits, backend="triton", **kw)
        same = (i_t.sort(-1).values == i_k.sort(-1).values).all(-1)
        res["route_same_experts_frac"] = same.float().mean().item()
        wa = w_t.gather(1, i_t.sort(-1).indices)[same]
        wb = w_k.gather(1, i_k.sort(-1).indices)[same]
        res["route_weights_scaled_err"] = scaled(wb, wa) if wa.numel() else 0.0

    names = ("out", "grad_x", "grad_weights", "grad_w_gate", "grad_w_up", "grad_w_down")
    for impl in impls:
        # one implementation at a time: a second set of DeepSeek-size gradients would not fit
        try:
            layer.zero_grad()
            xi = x.detach().clone().requires_grad_()
            wts = w_t.detach().clone().requires_grad_()
            ws = (layer.w_gate, layer.w_up, layer.w_down)
            with kernels.poisoned_outputs():
                if impl == "loop":
                    out = loop_experts(xi, i_t, wts, *ws)
                else:
                    out = kernels.moe_experts(xi, i_t, wts, *ws,
                                              backend="triton" if impl == "triton" else "torch")
                out.backward(layer.grad_out)
            cand = (out.detach(), xi.grad, wts.grad, *(p.grad for p in ws))
            ref = reference_with_grads(x, i_t, w_t, *ws, layer.grad_out, [cand])
            res[impl] = {n: ref[n][0] for n in names}
            del xi, wts, out, cand
        except Exception as exc:
            res[impl] = {n: float("nan") for n in names}
            res.setdefault("errors", []).append(f"{impl}: {exc!r}")
            log(f"correctness {impl} failed: {traceback.format_exc()}")
        layer.zero_grad()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def reference_with_grads(x, idx, w, w_gate, w_up, w_down, grad_out, candidates):
    """fp32 reference forward + backward one expert at a time; returns scaled errors per tensor
    for each candidate tuple (out, dx, dweights, dw_gate, dw_up, dw_down)."""
    T, H = x.shape
    E = w_gate.shape[0]
    out = torch.zeros(T, H, device=x.device)
    dx = torch.zeros(T, H, device=x.device)
    dwts = torch.zeros(w.shape, device=x.device)
    go = grad_out.float()
    # per-expert weight grads are compared on the fly: track max|diff| and max|ref| per candidate
    wdiff = {n: [0.0] * len(candidates) for n in ("grad_w_gate", "grad_w_up", "grad_w_down")}
    wmax = {n: 0.0 for n in wdiff}
    for e in range(E):
        tok, k = torch.where(idx == e)
        wg = w_gate[e].detach().float().requires_grad_()
        wu = w_up[e].detach().float().requires_grad_()
        wd = w_down[e].detach().float().requires_grad_()
        if tok.numel():
            xe = x[tok].detach().float().requires_grad_()
            we = w[tok, k].detach().float().requires_grad_()
            y = (F.silu(xe @ wg.T) * (xe @ wu.T)) @ wd.T
            contrib = y * we[:, None]
            out.index_add_(0, tok, contrib.detach())
            contrib.backward(go[tok])
            dx.index_add_(0, tok, xe.grad)
            dwts[tok, k] = we.grad
            ref_grads = (wg.grad, wu.grad, wd.grad)
        else:
            ref_grads = (torch.zeros_like(wg), torch.zeros_like(wu), torch.zeros_like(wd))
        for n, rg, ci in zip(wdiff, ref_grads, (3, 4, 5)):
            wmax[n] = max(wmax[n], rg.abs().max().item())
            for j, cand in enumerate(candidates):
                wdiff[n][j] = max(wdiff[n][j], (cand[ci][e].float() - rg).abs().max().item())
    res = {"out": [scaled(c[0], out) for c in candidates],
           "grad_x": [scaled(c[1], dx) for c in candidates],
           "grad_weights": [scaled(c[2], dwts) for c in candidates]}
    for n in wdiff:
        res[n] = [d / max(wmax[n], 1e-30) if math.isfinite(d) else float("inf") for d in wdiff[n]]
    return res


# ----------------------------------------------------------------------------- timings


_DEFAULTS: dict = {}


def set_cfg(kind, cfg):
    from moe_conformance.native.kernels import triton_moe

    setattr(triton_moe, CFG_NAMES[kind], dict(cfg))


TUNED: dict = {}  # per shape tag: the breakdown's fastest variant of each kind (preset "T")
BREAKDOWN_MD: list = []  # the breakdown's tables, appended to gpu_moe_layer.md
BREAKDOWN_ROWS: list = []  # the breakdown's timings per shape (breakdown.json)
KIND_PIECES = {"gate_up": ["fwd gate_up+swiglu (save)"], "rows": ["fwd down"],
               "dgrad_act": ["bwd d act (+swiglu bwd)"], "dgrad_x": ["bwd d x_sorted (dual)"],
               "wgrad_knobs": ["bwd wgrad down", "bwd wgrad gate+up"]}
# kind -> variant index -> {"setting": block shape (or wgrad knobs + block shape), "ms": {shape tag: ms}}
VARIANT_MS: dict = {}


def note_picks(picked):
    """The report's wording for defaults picked by --pick-defaults."""
    what = "; ".join(f"{k.replace('_knobs', '')}: {v['variant']} ({v['geomean_vs_default']:.3f}x)"
                     for k, v in picked.items()) or "none"
    PRESET_NOTES["A"] = ("the module's defaults, each kind's replaced by the variant this run's breakdown found at "
                         "least 2% faster across the shapes (geometric mean of its time over the default's): " + what)
    if BREAKDOWN_MD and not BREAKDOWN_MD[0].startswith("Defaults picked"):
        BREAKDOWN_MD.insert(0, f"Defaults picked from this breakdown for the layer benchmark (preset A): {what}. "
                               "Each piece's first variant is the default before that pick.")
        BREAKDOWN_MD.insert(1, "")


def pick_defaults(min_gain=0.02):
    """Make the breakdown's best variant across all shapes each kind's default, in this process.

    Across shapes = the lowest geometric mean of (variant ms / default ms) over every shape the
    default was timed on; a variant replaces the default only if that mean is min_gain below 1.
    Returns {kind: (setting, geometric mean, variant name)} of the kinds whose default changed."""
    picks = {}
    for kind, by_index in VARIANT_MS.items():
        base = by_index.get(0)
        if not base or not base["ms"]:
            continue
        best = (1.0, None)
        for i, v in by_index.items():
            if i == 0 or set(v["ms"]) != set(base["ms"]):
                continue
            gm = math.exp(statistics.fmean(math.log(v["ms"][t] / base["ms"][t]) for t in base["ms"]))
            if gm < best[0]:
                best = (gm, v["setting"])
        if best[1] is not None and best[0] <= 1 - min_gain:
            if kind == "wgrad_knobs":
                set_knobs(best[1]["knobs"])
                set_cfg("wgrad", best[1]["cfg"])
                name = _knobs_str(best[1]["knobs"], best[1]["cfg"])
            else:
                set_cfg(kind, best[1])
                name = _cfg_str(best[1])
            picks[kind] = (best[1], best[0], name)
    _DEFAULTS.clear()  # the next set_preset takes the module's (now picked) values as preset A
    return picks


def set_knobs(knobs):
    from moe_conformance.native.kernels import triton_moe

    for k, v in knobs.items():
        setattr(triton_moe, k, v)


def set_preset(name, tag=None):
    from moe_conformance.native.kernels import triton_moe

    if not _DEFAULTS:
        _DEFAULTS.update({k: dict(getattr(triton_moe, v)) for k, v in CFG_NAMES.items()})
        _DEFAULTS["knobs"] = {k: getattr(triton_moe, k) for k in WGRAD_KNOBS}
    over = TUNED.get(tag, {}) if name == "T" else PRESETS[name]
    for kind in CFG_NAMES:
        set_cfg(kind, over.get(kind, _DEFAULTS[kind]))
    set_knobs({**_DEFAULTS["knobs"], **over.get("knobs", {})})


def bench_layer(layer: Layer, impl, device, reps, warmup):
    x = layer.x

    def fwd():
        with torch.no_grad():
            layer.forward(impl, x)

    xg = x.detach().clone().requires_grad_()

    def fwd_bwd():
        layer.zero_grad()
        xg.grad = None
        layer.forward(impl, xg).backward(layer.grad_out)

    f_ms, _ = time_ms(fwd, device, warmup=warmup, reps=reps)
    fb_ms, _ = time_ms(fwd_bwd, device, warmup=warmup, reps=reps)
    layer.zero_grad()
    return f_ms, fb_ms


# --------------------------------------------------------------------------- breakdown


# Variants the breakdown times per GEMM kind (bf16 on a GPU); the first is the module default.
BREAKDOWN_VARIANTS = {
    "gate_up": [None, _c(128, 64, 64, 8, 3, GROUP_M=8), _c(128, 64, 64, 8, 4, GROUP_M=8),
                _c(128, 64, 128, 8, 3, GROUP_M=8)],
    "rows": [None, _c(128, 256, 64, 8, 4, GROUP_M=8), _c(128, 128, 64, 8, 4, GROUP_M=8)],
    "dgrad_act": [None, _c(128, 128, 64, 8, 3, GROUP_M=8)],
    "dgrad_x": [None, _c(128, 256, 64, 8, 4, GROUP_M=8, SPLIT_DUAL=True)],
    # weight gradients: WGRAD_KNOBS overrides, "cfg" a GPU_CONFIG_WGRAD block shape; None: the
    # module's defaults, the reference the others are checked against
    "wgrad": [None,
              # the defaults before 2026-12-02 16:05 (in-loop gathers, gate/up in one launch)
              dict(WGRAD="auto", WGRAD_SPLIT_DUAL=False, WGRAD_PRESORT=False, cfg=_c(64, 128, 128, 8, 3)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=False, WGRAD_PRESORT=False, cfg=_c(64, 128, 128, 8, 3)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=False, cfg=_c(64, 128, 128, 8, 3)),
              dict(WGRAD="auto", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=False, cfg=_c(64, 128, 128, 8, 3)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=False, cfg=_c(64, 128, 128, 8, 5)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=True, cfg=_c(64, 128, 128, 8, 3)),
              dict(WGRAD="auto", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=True, cfg=_c(64, 128, 128, 8, 3)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=False, WGRAD_PRESORT=True, cfg=_c(64, 128, 128, 8, 3)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=True, cfg=_c(64, 128, 128, 8, 4)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=True, cfg=_c(64, 256, 128, 8, 3)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=True, cfg=_c(64, 128, 256, 8, 3)),
              dict(WGRAD="triton", WGRAD_SPLIT_DUAL=True, WGRAD_PRESORT=True, cfg=_c(128, 128, 128, 8, 3)),
              dict(WGRAD="grouped_mm")],
}


def _cfg_str(c):
    if c is None:
        return "-"
    s = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
    return s + (" split" if c.get("SPLIT_DUAL") else "")


def _knobs_str(knobs, cfg):
    s = knobs["WGRAD"]
    if knobs["WGRAD"] != "grouped_mm":
        s += (" split" if knobs["WGRAD_SPLIT_DUAL"] else "") + (" presort" if knobs["WGRAD_PRESORT"] else "")
        s += " " + _cfg_str(cfg)
    if knobs["WGRAD"] != "triton" and knobs["WGRAD_GROUPED_T"]:
        s += " X^T G"
    return s


def _plausible(err):
    """A variant's scaled error against the first variant: two bf16 roundings apart at most."""
    return err is None or err <= 2e-2


def breakdown(layers, tokens, device, out_dir, reps, dtype=torch.bfloat16, all_variants=True, budget_s=math.inf):
    """Time every kernel of the Triton layer's forward and backward on its own (CUDA events,
    median), several block shapes per GEMM kind, each checked against the kind's first variant.
    Returns the fastest variant of each kind per shape (the benchmark's preset "T")."""
    set_preset("A")
    rows_out, best_all, tuned = [], {}, {}
    t_start = time.perf_counter()
    for name, spec in layers.items():
        for T in tokens:
            tag = f"{name} T={T}"
            if time.perf_counter() - t_start > budget_s:
                log(f"breakdown {tag}: skipped (over --breakdown-budget-s)")
                continue
            try:
                _breakdown_shape(name, spec, T, tag, device, dtype, reps, all_variants, rows_out, best_all, tuned)
            except Exception:
                log(f"ERROR breakdown {tag}: {traceback.format_exc()}")
            set_preset("A")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            with open(os.path.join(out_dir, "breakdown.json"), "w") as f:
                json.dump(rows_out, f, indent=1, default=str)
    return _breakdown_report(rows_out, out_dir, tuned)


def _breakdown_shape(name, spec, T, tag, device, dtype, reps, all_variants, rows_out, best_all, tuned):
    from moe_conformance.native.kernels import triton_moe as tm

    layer = Layer(spec, T, device, dtype)
    E, H, I, K = spec["E"], spec["H"], spec["I"], spec["K"]
    x, dout = layer.x, layer.grad_out
    wg, wu, wd = (w.detach() for w in (layer.w_gate, layer.w_up, layer.w_down))
    kw = dict(top_k=K, correction_bias=layer.bias, **spec["routing"])
    res = []

    def t(piece, variant, fn, ref=None):
        ms, _ = time_ms(fn, device, warmup=2, reps=reps)
        err = None
        if ref is not None:
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            refs = ref if isinstance(ref, tuple) else (ref,)
            err = max(scaled(o, r) for o, r in zip(outs, refs))
        res.append(dict(piece=piece, variant=variant, ms=ms, err=err))
        log(f"breakdown {tag} {piece} [{variant}]: {ms:.3f} ms" + (f" err {err:.1e}" if err is not None else ""))
        return ms

    def sweep(kind, piece, make):
        best, ref = None, None
        from moe_conformance.native.kernels import triton_moe as tm_

        default = dict(getattr(tm_, CFG_NAMES[kind]))
        variants = [v or default for v in BREAKDOWN_VARIANTS[kind]] if all_variants else [default]
        for i, cfg in enumerate(variants):
            set_cfg(kind, cfg)
            try:
                out = make()
                if ref is None:
                    ref = out
                ms = t(piece, _cfg_str(cfg), make, ref if i else None)
            except Exception as exc:
                log(f"breakdown {tag} {piece} [{_cfg_str(cfg)}] failed: {exc!r}"[:400])
                continue
            if not _plausible(res[-1]["err"]):
                log(f"breakdown {tag} {piece} [{_cfg_str(cfg)}] disagrees with the first variant: not picked")
                continue
            VARIANT_MS.setdefault(kind, {}).setdefault(i, dict(setting=dict(cfg), ms={}))["ms"][tag] = ms
            if best is None or ms < best[0]:
                best = (ms, cfg)
        set_cfg(kind, best[1] if best else variants[0])
        best_all.setdefault(tag, {})[kind] = _cfg_str(best[1]) if best else None
        tuned.setdefault(tag, {})[kind] = dict(best[1] if best else variants[0])
        return ref

    with torch.no_grad():
        logits = F.linear(x, layer.router)
        t("fwd router matmul", "", lambda: F.linear(x, layer.router))
        t("fwd route", "", lambda: kernels.route(logits, backend="triton", **kw))
        w, idx = kernels.route(logits, backend="triton", **kw)
        t("fwd permute + tile map", "", lambda: tm._Plan(idx, E).tiles(128))
        plan = tm._Plan(idx, E)
        gate, up, act = sweep("gate_up", "fwd gate_up+swiglu (save)",
                              lambda: tm._gate_up(plan, x, wg, wu, save_gate_up=True))
        y = sweep("rows", "fwd down", lambda: tm._rows_gemm(plan, act, tm._linear_view(wd), H, out_dtype=dtype))
        t("fwd combine", "", lambda: tm.combine_triton(y, plan.perm, w, dtype))
        # backward pieces, in TritonExperts.backward's order
        t("bwd router weight grad", "", lambda: tm._weight_grad(plan, dout, y))
        w_sorted = w.reshape(-1)[plan.perm.sorted_slots].float()
        d_gate, d_up = sweep("dgrad_act", "bwd d act (+swiglu bwd)", lambda: tm._rows_gemm(
            plan, dout, tm._transposed_view(wd), I, out_dtype=dtype, gather=True, row_scale=w_sorted,
            swiglu=(gate, up), kind="dgrad_act"))
        dx_sorted = sweep("dgrad_x", "bwd d x_sorted (dual)", lambda: tm._rows_gemm(
            plan, d_gate, tm._transposed_view(wg), H, out_dtype=dtype, a2=d_up, b2=wu, kind="dgrad_x"))
        t("bwd combine dx", "", lambda: tm.combine_triton(dx_sorted, plan.perm, None, dtype, top_k=K))
        best = {}
        refs = {}
        default = dict(knobs={k: getattr(tm, k) for k in WGRAD_KNOBS}, cfg=dict(tm.GPU_CONFIG_WGRAD))
        wvariants = [default] + [dict(knobs={**default["knobs"], **{k: v for k, v in var.items() if k != "cfg"}},
                                      cfg=var.get("cfg", default["cfg"]))
                                 for var in (BREAKDOWN_VARIANTS["wgrad"][1:] if all_variants else [])]
        for i, var in enumerate(wvariants):
            vname = _knobs_str(var["knobs"], var["cfg"])
            set_knobs(var["knobs"])
            set_cfg("wgrad", var["cfg"])
            fn_d = (lambda: tm._weight_gemm(plan, dout, act, (E, H, I), out_dtype=dtype, gather_g=True,
                                            row_scale=w_sorted))
            fn_gu = (lambda: tm._weight_gemm(plan, d_gate, x, (E, I, H), out_dtype=dtype, gather_x=True, g2=d_up))
            total = 0.0
            try:
                for piece, fn in (("bwd wgrad down", fn_d), ("bwd wgrad gate+up", fn_gu)):
                    if piece not in refs:
                        refs[piece] = fn()
                        total += t(piece, vname, fn)
                    else:
                        total += t(piece, vname, fn, refs[piece])
                    if not _plausible(res[-1]["err"]):
                        raise RuntimeError("disagrees with the first variant")
            except Exception as exc:
                log(f"breakdown {tag} wgrad [{vname}] failed: {exc!r}"[:400])
                continue
            VARIANT_MS.setdefault("wgrad_knobs", {}).setdefault(i, dict(setting=var, ms={}))["ms"][tag] = total
            if not best or total < best["ms"]:
                best = dict(ms=total, var=var, name=vname)
        del refs
        set_knobs(best["var"]["knobs"])
        set_cfg("wgrad", best["var"]["cfg"])
        best_all.setdefault(tag, {})["wgrad"] = best["name"]
        tuned.setdefault(tag, {})["knobs"] = dict(best["var"]["knobs"])
        tuned[tag]["wgrad"] = dict(best["var"]["cfg"])
        del gate, up, act, y, d_gate, d_up, dx_sorted
    log(f"breakdown {tag} fastest: {best_all.get(tag)}")
    rows_out.append(dict(layer=name, T=T, pieces=res, best=best_all.get(tag)))
    del layer


def _breakdown_report(rows_out, out_dir, tuned):
    lines = ["# Triton MoE layer: per-kernel breakdown", "",
             "Each kernel alone, median of CUDA-event timed calls; the first variant of a piece is the module's "
             "default, the others are checked against it (scaled max error).", "",
             "| layer | tokens | piece | variant | ms | scaled err vs first variant |", "|---|---|---|---|---|---|"]
    for r in rows_out:
        for p in r["pieces"]:
            err = "" if p["err"] is None else f"{p['err']:.1e}"
            lines.append(f"| {r['layer']} | {r['T']} | {p['piece']} | {p['variant']} | {p['ms']:.3f} | {err} |")
    lines += ["", "Fastest variant per kind (preset T of the layer benchmark where the run times that preset):", "",
              "| layer | tokens | fastest variants |", "|---|---|---|"]
    for r in rows_out:
        lines.append(f"| {r['layer']} | {r['T']} | {r['best']} |")
    with open(os.path.join(out_dir, "breakdown.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    BREAKDOWN_MD[:] = lines[2:]
    BREAKDOWN_ROWS[:] = rows_out
    return tuned, breakdown_summary(rows_out)


def breakdown_summary(rows_out, variant_of_piece=None):
    """Per shape, each piece's ms under the module's defaults (the report's 'bound' column): the
    variant named in variant_of_piece (the picked defaults), else the piece's first variant."""
    variant_of_piece = variant_of_piece or {}
    summary = {}
    for r in rows_out:
        d = summary.setdefault(f"{r['layer']} T={r['T']}", {})
        for p in r["pieces"]:
            if p["piece"] not in d or p["variant"] == variant_of_piece.get(p["piece"]):
                d[p["piece"]] = p["ms"]
    return summary


# -------------------------------------------------------------------------------- main


def run_checks(device, out_dir, results):
    """The kernel conformance checks natively on this device, and the Triton noise floor."""
    from moe_conformance.kernel_checks import checks
    from moe_conformance.kernel_checks.strategies import RoutingConfig

    arch_routing = {
        "qwen3_moe-like": RoutingConfig("softmax", norm_topk_prob=True),
        "deepseek_v3-like": RoutingConfig("sigmoid", 4, 2, True, 2.5, True),
        "kimi_k25-like": RoutingConfig("sigmoid", 1, 1, True, 2.827, True),
    }
    rows = []
    for arch, routing in arch_routing.items():
        t0 = time.perf_counter()
        try:
            res = checks.run_kernel_checks(routing, backends=("torch", "triton"),
                                           dtypes=(torch.bfloat16, torch.float16, torch.float32),
                                           device=str(device), max_examples=8)
            status = "pass"
            err = ""
        except Exception as exc:  # a crash is a failure of this arch's checks, not of the run
            res, status, err = [], "FAIL", f"{type(exc).__name__}: {exc}"
        dt = time.perf_counter() - t0
        log(f"checks {arch}: {status} ({len(res)} results, {dt:.1f}s) {err[:500]}")
        rows.append({"arch": arch, "routing": routing.describe(), "status": status, "error": err,
                     "seconds": dt, "results": res})
    results["checks"] = rows
    # noise floor of every backend on this device (bf16 triton only measurable here)
    floors = {}
    for key in list(checks.GATES):
        checks.GATES[key] = math.inf
    from moe_conformance.kernel_checks.strategies import ExpertsCase

    shapes = [(7, 19, 13, 6, 3, "random"), (12, 24, 20, 8, 2, "some_empty"),
              (5, 32, 16, 9, 8, "random"), (9, 17, 11, 5, 1, "all_on_one")]
    for backend in ("torch", "triton"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            if not checks.backend_available(backend, str(device), dtype)[0]:
                continue
            for seed in range(24):
                T, H, I, E, K, dist = shapes[seed % 4]
                case = ExpertsCase(T, H, I, E, K, dist, seed)
                for op, fn in (("combine", checks.check_combine), ("experts", checks.check_experts)):
                    r = fn(case, backend=backend, dtype=dtype, device=str(device))
                    k = f"{op} {str(dtype)[6:]} {backend}"
                    floors[k] = max(floors.get(k, 0.0), r["max_error"])
    results["noise_floor"] = floors
    for k, v in sorted(floors.items()):
        log(f"noise floor {k}: {v:.2e}")


def write_reports(results, out_dir):
    with open(os.path.join(out_dir, "gpu_moe_layer.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    env = results["env"]
    lines = [
        "# MoE layer benchmark (GPU)", "",
        f"- device: {env['device']}  ",
        f"- date: {env['date']}  ",
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}  ",
        f"- bf16 matmul peak measured in this run (8192^3 torch.matmul): {env.get('peak_tflops', float('nan')):.0f} TFLOP/s  ",
        "- layer = router matmul + routing + permutation + gate/up + SwiGLU + down + top-k combine, bf16, "
        "router math fp32; fwd+bwd includes grads for x, router and all expert weights  ",
        "- TFLOP/s count the useful FLOPs (6·T·K·H·I + 2·T·H·E forward, 3x for fwd+bwd); "
        "'% peak' is that over the matmul peak above  ",
        f"- timings: median of {results['reps']} CUDA-event timed calls after warm-up "
        f"(loop: {results['loop_reps']} calls); triton block shapes: best of presets {results.get('presets', list(PRESETS))} per shape  ",
        "- presets: " + "; ".join(f"{p}: {PRESET_NOTES.get(p, p)}" for p in results.get("presets", [])) + "  ",
        "",
        "| layer | tokens | impl | fwd ms | fwd TFLOP/s | fwd % peak | fwd of ceiling | fwd+bwd ms | fwd+bwd TFLOP/s | "
        "fwd+bwd % peak | fwd+bwd of ceiling | triton speed-up fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peak = env.get("peak_tflops", float("nan"))
    for r in results["timings"]:
        ceiling = r.get("ceiling", (float("nan"), float("nan")))
        for impl in ("triton", "grouped_mm", "ceiling", "loop"):
            if impl not in r:
                continue
            f_ms, fb_ms = r[impl]
            tf, tfb = r["flops_fwd"] / f_ms / 1e9, r["flops_fwd_bwd"] / fb_ms / 1e9
            tri = r.get("triton")
            sp = f"{f_ms / tri[0]:.2f}x / {fb_ms / tri[1]:.2f}x" if tri and impl != "triton" else ""
            name = impl + (f" (preset {r['preset']})" if impl == "triton" else "")
            lines.append(f"| {r['layer']} | {r['T']} | {name} | {f_ms:.2f} | {tf:.0f} | {100 * tf / peak:.0f}% | "
                         f"{ceiling[0] / f_ms:.2f} | {fb_ms:.2f} | {tfb:.0f} | {100 * tfb / peak:.0f}% | "
                         f"{ceiling[1] / fb_ms:.2f} | {sp} |")
    lines += ["", "Speed-up = that implementation's time / triton's time (>1: triton faster). 'of ceiling' = the "
              "ceiling's time / this time (1.00: as fast as the expert GEMMs alone on pre-permuted tokens); "
              "the ceiling's TFLOP/s count the same FLOPs as the layer's (its router matmul excluded from its time).", "",
              "## Speed goal", "",
              "triton >= 1.0x the grouped_mm layer, each shape and direction; forward >= 60% of the measured peak "
              "at 16k tokens.", "",
              "| layer | tokens | fwd vs grouped_mm | fwd+bwd vs grouped_mm | fwd % peak | met | bound |",
              "|---|---|---|---|---|---|---|"]
    for r in results["timings"]:
        if "triton" not in r or "grouped_mm" not in r:
            continue
        (tf_ms, tfb_ms), (gf_ms, gfb_ms) = r["triton"], r["grouped_mm"]
        ceiling = r.get("ceiling", (float("nan"), float("nan")))
        pct = 100 * r["flops_fwd"] / tf_ms / 1e9 / peak
        ok = gf_ms / tf_ms >= 1.0 and gfb_ms / tfb_ms >= 1.0 and (r["T"] < 16384 or pct >= 60)
        bound = (f"the ceiling itself reaches {100 * r['flops_fwd'] / ceiling[0] / 1e9 / peak:.0f}% of peak forward; "
                 f"triton reaches {ceiling[0] / tf_ms:.2f} / {ceiling[1] / tfb_ms:.2f} of it (fwd / fwd+bwd)")
        pieces = results.get("breakdown", {}).get(f"{r['layer']} T={r['T']}")
        if pieces:
            fwd_p = {k: v for k, v in pieces.items() if k.startswith("fwd")}
            bwd_p = {k: v for k, v in pieces.items() if k.startswith("bwd")}
            top = lambda d: ", ".join(f"{k[4:]} {v:.2f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:3])  # noqa: E731
            bound += (f"; kernels alone (ms, module defaults): fwd sum {sum(fwd_p.values()):.2f} (largest: {top(fwd_p)}), "
                      f"bwd sum {sum(bwd_p.values()):.2f} (largest: {top(bwd_p)})")
        lines.append(f"| {r['layer']} | {r['T']} | {gf_ms / tf_ms:.2f}x | {gfb_ms / tfb_ms:.2f}x | {pct:.0f}% | "
                     f"{'yes' if ok else 'no'} | {bound} |")
    lines += ["",
              "## Correctness in the same run (scaled max error vs fp32 per-expert reference)", "",
              "| layer | tokens | impl | out | grad_x | grad_weights | grad_w_gate | grad_w_up | grad_w_down |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["correctness"]:
        for impl in ("triton", "grouped_mm", "loop"):
            if impl in r:
                c = r[impl]
                lines.append(f"| {r['layer']} | {r['T']} | {impl} | " + " | ".join(
                    f"{c[n]:.2e}" for n in ("out", "grad_x", "grad_weights", "grad_w_gate", "grad_w_up", "grad_w_down")) + " |")
    lines += ["", "Routing: triton vs torch router on the same logits: " + "; ".join(
        f"{r['layer']} T={r['T']}: same experts {100 * r['route_same_experts_frac']:.3f}% of tokens, "
        f"weights scaled err {r['route_weights_scaled_err']:.1e}" for r in results["correctness"])]
    if results.get("preset_sweep"):
        lines += ["", "Preset sweep (triton fwd+bwd ms): " + "; ".join(
            f"{k}: " + ", ".join(f"{p}={v:.2f}" for p, v in d.items()) for k, d in results["preset_sweep"].items())]
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    if BREAKDOWN_MD:
        lines += ["", "## Per-kernel breakdown (same run)", ""] + BREAKDOWN_MD
    with open(os.path.join(out_dir, "gpu_moe_layer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    if "checks" in results:
        ck = ["# Kernel conformance checks on the GPU", "",
              f"{env['device']}, {env['date']}, torch {env['torch']}, triton {env['triton']}; "
              "`checks.run_kernel_checks(routing, backends=(torch, triton), dtypes=(bf16, fp16, fp32), "
              "device='cuda', max_examples=8)` per routing config, gates from checks.GATES.", "",
              "| arch routing | status | cases | seconds | worst scaled error / gate per (op, backend, dtype) |",
              "|---|---|---|---|---|"]
        for row in results["checks"]:
            worst = {}
            for r in row["results"]:
                if "max_error" in r:
                    k = (r["op"], r["backend"], r["dtype"])
                    if r["max_error"] >= worst.get(k, (-1, 0))[0]:
                        worst[k] = (r["max_error"], r["gate"])
            cell = "; ".join(f"{o}/{b}/{d}: {e:.1e}/{g:.1e}" if g else f"{o}/{b}/{d}: exact"
                             for (o, b, d), (e, g) in sorted(worst.items()))
            ck.append(f"| {row['arch']} ({row['routing']}) | {row['status']} | {len(row['results'])} | "
                      f"{row['seconds']:.0f} | {cell} |")
            if row["error"]:
                ck.append(f"\nFAILURE: {row['error']}\n")
        ck += ["", "Noise floor on this GPU (max scaled error vs fp64 over 24 seeds x 4 shapes):", "",
               "| op dtype backend | floor |", "|---|---|"]
        ck += [f"| {k} | {v:.2e} |" for k, v in sorted(results.get("noise_floor", {}).items())]
        with open(os.path.join(out_dir, "gpu_kernel_checks.md"), "w") as f:
            f.write("\n".join(ck) + "\n")
        with open(os.path.join(out_dir, "gpu_kernel_checks.json"), "w") as f:
            json.dump({"checks": results["checks"], "noise_floor": results.get("noise_floor")}, f,
                      indent=1, default=str)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--loop-reps", type=int, default=3, help="0: leave the per-expert loop out")
    ap.add_argument("--presets", default="A,B,C")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--checks-only", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="first time each Triton kernel of the layer (several block shapes per GEMM kind); "
                         "preset T is then the fastest variant of each kind per shape")
    ap.add_argument("--breakdown-only", action="store_true", help="with --breakdown: stop after it")
    ap.add_argument("--breakdown-reps", type=int, default=5)
    ap.add_argument("--breakdown-budget-s", type=float, default=300.0,
                    help="shapes left when the breakdown has run this long are skipped")
    ap.add_argument("--pick-defaults", action="store_true",
                    help="with --breakdown: the variant of each kind fastest across the shapes (geometric mean, "
                         "at least 2%% faster) becomes the module's default in this process (preset A); the "
                         "picks are logged and saved in the json, to be written into triton_moe.py")
    ap.add_argument("--breakdown-defaults", action="store_true",
                    help="with --breakdown: time only the module's default block shapes")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    layers = SMOKE_LAYERS if args.smoke else {k: LAYERS[k] for k in args.layers.split(",")}
    tokens = [16, 40] if args.smoke else [int(t) for t in args.tokens.split(",")]
    results = {"reps": args.reps, "loop_reps": args.loop_reps, "presets": args.presets.split(","), "timings": [], "correctness": [],
               "errors": [], "preset_sweep": {}}
    results["env"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        results["env"]["peak_tflops"] = matmul_peak(device)
    log(f"env {results['env']}")
    presets = args.presets.split(",")
    if args.breakdown:
        try:
            tuned, results["breakdown"] = breakdown(layers, tokens, device, args.out, args.breakdown_reps, dtype,
                                                    not args.breakdown_defaults, args.breakdown_budget_s)
            TUNED.update(tuned)
        except Exception as exc:  # the layer benchmark still runs, preset T falling back to the defaults
            results["errors"].append(f"breakdown: {exc!r}")
            log(f"ERROR breakdown: {traceback.format_exc()}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["tuned"] = {k: {kk: str(vv) for kk, vv in v.items()} for k, v in TUNED.items()}
        results["breakdown_variants"] = {k: {str(i): v for i, v in d.items()} for k, d in VARIANT_MS.items()}
        if args.pick_defaults:
            set_preset("A")
            picks = pick_defaults()
            results["picked_defaults"] = {k: dict(setting=v[0], geomean_vs_default=v[1], variant=v[2])
                                          for k, v in picks.items()}
            note_picks(results["picked_defaults"])
            results["breakdown"] = breakdown_summary(BREAKDOWN_ROWS, {
                piece: v[2] for k, v in picks.items() for piece in KIND_PIECES[k]})
            log(f"picked defaults: {results['picked_defaults']}")
        if args.breakdown_only:
            with open(os.path.join(args.out, "gpu_moe_layer.log"), "w") as f:
                f.write("\n".join(LOG) + "\n")
            return

    if args.checks_only:
        layers, tokens = {}, []
    for name, spec in layers.items():
        for T in tokens:
            tag = f"{name} T={T}"
            try:
                if device.type == "cuda":
                    set_preset(presets[0], tag)
                layer = Layer(spec, T, device, dtype)
                impls = ["triton", "grouped_mm"] + (["loop"] if args.loop_reps > 0 else [])
                t0 = time.perf_counter()
                corr = check_layer(layer, impls, device)
                corr.update(layer=name, T=T)
                results["correctness"].append(corr)
                log(f"correctness {tag} ({time.perf_counter() - t0:.1f}s): "
                    + json.dumps({k: v for k, v in corr.items()}, default=str))
                row = {"layer": name, "T": T, "flops_fwd": layer.flops(False), "flops_fwd_bwd": layer.flops(True)}
                sweep = {}
                best = None
                for p in presets:
                    if device.type == "cuda":
                        set_preset(p, tag)
                    try:
                        f_ms, fb_ms = bench_layer(layer, "triton", device, args.reps, 3)
                    except Exception as exc:  # e.g. a preset that needs too much shared memory
                        log(f"triton {tag} preset {p} failed: {exc!r}")
                        layer.zero_grad()
                        continue
                    sweep[p] = fb_ms
                    log(f"triton {tag} preset {p}: fwd {f_ms:.3f} ms, fwd+bwd {fb_ms:.3f} ms")
                    if best is None or fb_ms < best[2]:
                        best = (p, f_ms, fb_ms)
                    if device.type != "cuda":
                        break
                results["preset_sweep"][tag] = sweep
                if best is None:
                    raise RuntimeError("every triton preset failed")
                row["preset"] = best[0]
                row["triton"] = (best[1], best[2])
                row["grouped_mm"] = bench_layer(layer, "grouped_mm", device, args.reps, 3)
                log(f"grouped_mm {tag}: {row['grouped_mm']}")
                row["ceiling"] = bench_ceiling(layer, device, args.reps, 3)
                log(f"ceiling {tag}: {row['ceiling']}")
                if args.loop_reps > 0:
                    row["loop"] = bench_layer(layer, "loop", device, args.loop_reps, 1)
                    log(f"loop {tag}: {row['loop']}")
                results["timings"].append(row)
                del layer
            except Exception as exc:  # keep the rest of the run
                results["errors"].append(f"{tag}: {exc!r}")
                log(f"ERROR {tag}: {traceback.format_exc()}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_reports(results, args.out)

    if not args.skip_checks:
        try:
            if device.type == "cuda":
                set_preset("A")  # the layer loop leaves the last preset set; the checks are of the defaults
            run_checks(device, args.out, results)
        except Exception as exc:
            results["errors"].append(f"checks: {exc!r}")
            log(f"ERROR checks: {traceback.format_exc()}")
    write_reports(results, args.out)
    with open(os.path.join(args.out, "gpu_moe_layer.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    print(open(os.path.join(args.out, "gpu_moe_layer.md")).read())


if __name__ == "__main__":
    main()
