"""Kernel-vs-reference checks, one case at a time, with measured gates.

Each `check_*` function builds its tensors from a case's seed, runs one backend on one
device/dtype, compares against the slow references in `reference.py` computed in fp64 on the
CPU (from the *same* rounded inputs, so only the kernel's own arithmetic is measured), and
either returns a dict of figures (for a report) or raises AssertionError whose message names
the op, the case (shape), dtype, backend, device and the worst element (index, got, expected,
error, gate).

Two habits make unwritten memory visible:
- every output and gradient a kernel allocates is poisoned with NaN first
  (`subjects.poisoned_outputs`), so a row nobody wrote fails as NaN instead of passing as 0;
- forward and backward run twice, so state left over from the first pass (a reused
  workspace, a buffer assumed zero) shows up on the second.

Error metric: scaled error = |got - expected| / max|expected| over the tensor (NaN or inf
counts as infinite). Gates are per dtype, measured with benchmarks/kernel_noise_floor.py.
"""

from __future__ import annotations

import time

import torch

from .reference import combine_reference, experts_reference, permute_reference, route_reference
from .strategies import ExpertsCase, RouteCase, RoutingConfig
from .subjects import KernelSubject, poisoned_outputs, resolve

__all__ = [
    "GATES", "gate_for", "backend_available", "check_route", "check_permutation",
    "check_combine", "check_experts", "run_kernel_checks",
]

# ------------------------------------------------------------------------------- gates
# Measured floors: worst scaled error vs fp64 over 24 seeds (4 shapes incl. K=8, an empty-expert
# and an all-on-one load), torch and triton backends, every output and gradient; CPU, torch
# 2.13, triton 3.9 interpreter; `TRITON_INTERPRET=1 python benchmarks/kernel_noise_floor.py`.
# Gate = floor x margin, rounded. bf16 floors are the CPU torch backend's; the H100 run
# (benchmarks/results/gpu_kernel_checks.md, same script logic) measured triton bf16 at
# experts 1.0e-2 / combine 3.5e-3 and every other floor within 10% of the CPU figures.
#   route weights (fp32 math, fp32 or bf16 logits): floor 1.9e-7  -> gate 2e-6   (10x)
#   combine  fp32: 1.3e-7 -> 1.5e-6 (11x)   fp16: 4.3e-4 -> 2e-3 (4.6x)   bf16: 3.5e-3 -> 1.6e-2 (4.5x)
#   experts  fp32: 5.6e-7 -> 5e-6   (9x)    fp16: 2.6e-3 -> 1e-2 (4x)     bf16: 1.2e-2 -> 5e-2   (4x)
# fp32 is the semantic-parity gate and keeps a ~10x margin; the 16-bit floors come from
# rounding stored intermediates (gate/up/act/expert outputs), so their gates only need to sit
# clearly above that rounding: the planted bugs in tests/kernels exceed the fp32 gates by >100x.
GATES = {
    ("route", "any"): 2e-6,
    ("combine", torch.float32): 1.5e-6,
    ("combine", torch.float16): 2e-3,
    ("combine", torch.bfloat16): 1.6e-2,
    ("experts", torch.float32): 5e-6,
    ("experts", torch.float16): 1e-2,
    ("experts", torch.bfloat16): 5e-2,
}
# A token whose k-th and (k+1)-th candidates (or kept/dropped groups) are closer than this
# may legitimately flip between fp32 implementations: it is skipped and counted.
ROUTE_TIE_MARGIN = 1e-5


def gate_for(op: str, dtype: torch.dtype) -> float:
    return GATES[(op, "any")] if (op, "any") in GATES else GATES[(op, dtype)]


def backend_available(backend: str | KernelSubject, device: str, dtype: torch.dtype = torch.float32):
    """(ok, reason): whether these kernels can run here at all, for skipping with a reason."""
    why = resolve(backend).why_not(device, dtype)
    return why is None, why or ""


# ---------------------------------------------------------------------------- helpers


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _label(op, case, backend, dtype, device) -> str:
    name = backend.name if isinstance(backend, KernelSubject) else backend
    return f"[{op}] {case.describe()} dtype={_dtype_name(dtype)} backend={name} device={device}"


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor, gate: float, label: str) -> dict:
    """Scaled max error of `got` vs fp64 `expected`; raise naming the worst element."""
    got64 = got.detach().to("cpu", torch.float64)
    exp64 = expected.detach().to("cpu", torch.float64)
    if got64.shape != exp64.shape:
        raise AssertionError(f"{label}: {name} has shape {tuple(got64.shape)}, expected {tuple(exp64.shape)}")
    if exp64.numel() == 0:
        return {"max_error": 0.0, "gate": gate}
    scale = max(exp64.abs().max().item(), 1e-30)
    err = (got64 - exp64).abs() / scale
    err = torch.where(torch.isfinite(got64), err, torch.full_like(err, float("inf")))
    worst = int(torch.argmax(torch.nan_to_num(err, nan=float("inf"))))
    max_err = err.reshape(-1)[worst].item()
    if not max_err <= gate:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{label}: {name} worst element {idx}: got {got64.reshape(-1)[worst].item():.6g}, "
            f"expected {exp64.reshape(-1)[worst].item():.6g}, scaled error {max_err:.3g} > gate "
            f"{gate:.3g} (scale max|expected|={scale:.3g}; "
            f"{int((err > gate).sum())} of {err.numel()} elements over the gate)")
    return {"max_error": max_err, "gate": gate}


def _exact(name, got, expected, label):
    got_c, exp_c = got.detach().to("cpu"), expected.detach().to("cpu")
    if got_c.shape != exp_c.shape:
        raise AssertionError(f"{label}: {name} has shape {tuple(got_c.shape)}, expected {tuple(exp_c.shape)}")
    bad = torch.nonzero(got_c != exp_c)
    if bad.numel():
        idx = tuple(int(i) for i in bad[0])
        raise AssertionError(
            f"{label}: {name} element {idx}: got {got_c[idx].item()}, expected {exp_c[idx].item()} "
            f"({bad.shape[0]} of {exp_c.numel()} elements differ)")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- routing


def make_route_inputs(case: RouteCase):
    g = _generator(case.seed)
    # std 2 logits: peaky enough that the top-k is decided well above fp32 noise
    logits = torch.randn(case.tokens, case.num_experts, generator=g) * 2.0 + case.logit_shift
    bias = None
    if case.routing.has_correction_bias:
        # both signs plus a common offset, like trained DeepSeek-V3 biases
        bias = torch.randn(case.num_experts, generator=g) * 0.5 + case.bias_offset
    return logits, bias


def _route_kwargs(case: RouteCase, bias):
    r = case.routing
    return dict(scoring=r.scoring, top_k=case.top_k, correction_bias=bias, n_group=r.n_group,
                topk_group=r.topk_group, norm_topk_prob=r.norm_topk_prob,
                routed_scaling_factor=r.routed_scaling_factor)


def _reference_kwargs(case: RouteCase, bias):
    return {**_route_kwargs(case, bias), "group_score": case.routing.group_score}


def _route_near_ties(logits, bias, case: RouteCase) -> torch.Tensor:
    """Tokens whose expert or group choice is within ROUTE_TIE_MARGIN of flipping (fp64)."""
    margins = case.routing.margins(logits, case.top_k, bias.double() if bias is not None else None)
    tied = torch.zeros(logits.shape[0], dtype=torch.bool)
    for m in margins.values():
        tied |= m < ROUTE_TIE_MARGIN
    return tied


def check_route(case: RouteCase, *, backend: str, device: str = "cpu",
                logits_dtype: torch.dtype = torch.float32) -> dict:
    """route() vs the per-token fp64 reference: same expert set, weights within the gate."""
    label = _label("route", case, backend, logits_dtype, device)
    logits, bias = make_route_inputs(case)
    logits = logits.to(logits_dtype)
    exp_w, exp_i = route_reference(logits, **_reference_kwargs(case, bias))
    tied = _route_near_ties(logits, bias, case)
    keep = ~tied
    figures = {}
    for run in (1, 2):
        with poisoned_outputs():
            w, i = resolve(backend).route(logits.to(device), **_route_kwargs(case, bias.to(device) if bias is not None else None))
        if w.dtype != torch.float32 or i.dtype != torch.int64:
            raise AssertionError(f"{label}: route returned {w.dtype}/{i.dtype}, expected float32/int64")
        w, i = w.cpu(), i.cpu()
        # order within the k chosen is not part of the contract: compare sorted by expert id
        got_i, order = i.sort(-1)
        exp_i_s, exp_order = exp_i.sort(-1)
        _exact(f"indices (sorted per token, run {run}; {int(tied.sum())} near-tied tokens skipped)",
               got_i[keep], exp_i_s[keep], label)
        figures = {"weights": _compare(f"weights (run {run})", w.gather(1, order)[keep],
                                       exp_w.gather(1, exp_order)[keep], gate_for("route", logits_dtype), label)}
    return _result("route", case, backend, logits_dtype, device, figures, near_ties=int(tied.sum()))


# ----------------------------------------------------------------- experts' inputs


def make_experts_indices(case: ExpertsCase) -> torch.Tensor:
    """[T, K] distinct experts per token following the case's distribution."""
    g = _generator(case.seed)
    T, E, K = case.tokens, case.num_experts, case.top_k
    rows = []
    for _ in range(T):
        if case.distribution == "some_empty":
            pool = max(K, E // 2)  # experts pool..E-1 never receive a token
            rows.append(torch.randperm(pool, generator=g)[:K])
        elif case.distribution == "all_on_one":
            hot = case.seed % E
            others = torch.tensor([e for e in range(E) if e != hot])
            rest = others[torch.randperm(E - 1, generator=g)[:K - 1]]
            rows.append(torch.cat([torch.tensor([hot]), rest])[torch.randperm(K, generator=g)])
        else:
            rows.append(torch.randperm(E, generator=g)[:K])
    return torch.stack(rows).to(torch.int64) if rows else torch.zeros(0, K, dtype=torch.int64)


def make_experts_inputs(case: ExpertsCase, dtype: torch.dtype):
    """x, indices, weights (fp32), w_gate, w_up, w_down, grad_out; activations stay O(1)."""
    g = _generator(case.seed + 1)
    T, H, I, E, K = case.tokens, case.hidden, case.intermediate, case.num_experts, case.top_k
    x = torch.randn(T, H, generator=g).to(dtype)
    weights = (torch.rand(T, K, generator=g) * 0.9 + 0.1).float()
    w_gate = (torch.randn(E, I, H, generator=g) * H ** -0.5 * 2).to(dtype)
    w_up = (torch.randn(E, I, H, generator=g) * H ** -0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    grad_out = torch.randn(T, H, generator=g).to(dtype)
    return x, make_experts_indices(case), weights, w_gate, w_up, w_down, grad_out


# ------------------------------------------------------------------------ permutation


PERMUTATION_FIELDS = ("tokens_per_expert", "offsets", "sorted_slots", "slot_rows")


def check_permutation(case: ExpertsCase, *, backend: str, device: str = "cpu") -> dict:
    """permute() vs the counting-sort reference: every index map equal, element by element."""
    label = _label("permute", case, backend, torch.int64, device)
    indices = make_experts_indices(case)
    expected = permute_reference(indices, case.num_experts)
    for run in (1, 2):
        with poisoned_outputs():
            perm = resolve(backend).permute(indices.to(device), case.num_experts)
        perm = tuple(perm)
        if len(perm) != 4:
            raise AssertionError(f"{label}: permute returned {len(perm)} values, expected 4 "
                                 f"(tokens_per_expert, offsets, sorted_slots, slot_rows)")
        for name, got, exp in zip(PERMUTATION_FIELDS, perm, expected):
            _exact(f"{name} (run {run})", got, exp, label)
    return _result("permute", case, backend, torch.int64, device, {})


def check_combine(case: ExpertsCase, *, backend: str, dtype: torch.dtype, device: str = "cpu") -> dict:
    """combine() (unpermute + weighted top-k sum, fp32 accumulation) vs an fp64 loop."""
    label = _label("combine", case, backend, dtype, device)
    g = _generator(case.seed + 2)
    indices = make_experts_indices(case)
    S = indices.numel()
    # expert outputs of mixed sign and magnitude: low-precision accumulation shows here
    y_sorted = (torch.randn(S, case.hidden, generator=g) * (1 + 30 * torch.rand(S, 1, generator=g))).to(dtype)
    weights = (torch.rand(*indices.shape, generator=g) * 0.9 + 0.1).float()
    perm_ref = permute_reference(indices, case.num_experts)
    expected = combine_reference(y_sorted, perm_ref[3], weights)
    figures = {}
    for run in (1, 2):
        subject = resolve(backend)
        perm = subject.permute(indices.to(device), case.num_experts)
        with poisoned_outputs():
            out = subject.combine(y_sorted.to(device), perm, weights.to(device))
        figures = {"out": _compare(f"out (run {run})", out, expected, gate_for("combine", dtype), label)}
    return _result("combine", case, backend, dtype, device, figures)


# ---------------------------------------------------------------------------- experts


def _call_stage(subject: KernelSubject, stage: str, x, indices, weights, w_gate, w_up, w_down):
    if stage == "fused_moe":
        # the common fused shape: gate rows, then up rows; the gradients reach w_gate/w_up through the cat
        return subject.fused_moe(x, torch.cat((w_gate, w_up), dim=1), w_down, weights, indices)
    return subject.experts(x, indices, weights, w_gate, w_up, w_down)


def check_experts(case: ExpertsCase, *, backend: str | KernelSubject, dtype: torch.dtype, device: str = "cpu",
                  stage: str = "experts") -> dict:
    """The experts stage (``experts``, or ``fused_moe``) forward and backward (x, weights, w_gate,
    w_up, w_down) vs fp64 loops.

    Also asserts that the weight gradients of experts that received no token are exactly 0, and
    that the kernel left its inputs as it found them (a kernel writing outside its rows lands
    in someone else's memory: here, its inputs).
    """
    label = _label(stage, case, backend, dtype, device)
    subject = resolve(backend)
    x, indices, weights, w_gate, w_up, w_down, grad_out = make_experts_inputs(case, dtype)
    names = ("x", "weights", "w_gate", "w_up", "w_down")
    ref_in = [t.double().requires_grad_() for t in (x, weights, w_gate, w_up, w_down)]
    ref_out = experts_reference(ref_in[0], indices, *ref_in[1:])
    ref_out.backward(grad_out.double())
    empty = torch.bincount(indices.reshape(-1), minlength=case.num_experts) == 0
    gate = gate_for("experts", dtype)
    figures = {}
    for run in (1, 2):
        ins = [t.detach().to(device, copy=True).requires_grad_() for t in (x, weights, w_gate, w_up, w_down)]
        idx = indices.to(device)
        before = [t.detach().clone() for t in (*ins, idx)]
        with poisoned_outputs():
            out = _call_stage(subject, stage, ins[0], idx, *ins[1:])
            if out.dtype != dtype:
                raise AssertionError(f"{label}: output dtype {out.dtype}, expected {dtype}")
            out.backward(grad_out.to(device))
        for name, was, now in zip((*names, "indices"), before, (*ins, idx)):
            if not torch.equal(was, now.detach()):
                changed = int((was != now.detach()).sum())
                raise AssertionError(f"{label}: the kernel wrote into its input {name} ({changed} element(s) changed, "
                                     f"run {run}): it writes outside its own output rows")
        try:
            figures = {"out": _compare(f"out (run {run})", out, ref_out, gate, label)}
        except AssertionError as exc:
            if empty.any():  # the usual suspect when it is there: say so
                raise AssertionError(f"{exc} [the case has {int(empty.sum())} expert(s) with no token: "
                                     f"{torch.nonzero(empty).flatten().tolist()}]") from None
            raise
        for name, got, ref in zip(names, ins, ref_in):
            if got.grad is None:
                raise AssertionError(f"{label}: grad_{name} is None (run {run}): gradient not propagated")
            figures[f"grad_{name}"] = _compare(f"grad_{name} (run {run})", got.grad, ref.grad, gate, label)
        for name, got in zip(names[2:], ins[2:]):
            leaked = got.grad.detach().cpu()[empty]
            if leaked.numel() and not bool((leaked == 0).all()):
                e = int(torch.nonzero(empty)[int(torch.nonzero(leaked.reshape(leaked.shape[0], -1) != 0)[0, 0])])
                raise AssertionError(f"{label}: grad_{name}[expert {e}] is not exactly zero although "
                                     f"expert {e} received no token (run {run})")
    return _result(stage, case, backend, dtype, device, figures, empty_experts=int(empty.sum()))


def _result(op, case, backend, dtype, device, figures, **extra) -> dict:
    worst = max((f["max_error"] for f in figures.values()), default=0.0)
    name = backend.name if isinstance(backend, KernelSubject) else backend
    return {"op": op, "case": case.describe(), "backend": name, "dtype": _dtype_name(dtype),
            "device": str(device), "max_error": worst,
            "gate": min((f["gate"] for f in figures.values()), default=None),
            "tensors": figures, **extra}


# ------------------------------------------------------------------------- check set


def run_kernel_checks(routing: RoutingConfig | None = None, *, backends=("torch", "triton"),
                      dtypes=(torch.float32, torch.float16), device: str = "cpu",
                      max_examples: int = 2, skip_unavailable: bool = True) -> list[dict]:
    """The whole kernel check set for one architecture's routing config.

    Fixed edge cases (all four in the first dtype, the two skewed loads in the others) plus
    `max_examples` hypothesis-drawn cases per (op, backend, dtype), drawn deterministically
    (CI profile). The defaults fit ~8 s on a 2-core CPU with the Triton interpreter. Returns one figures dict per case; raises on the
    first failure (hypothesis shrinks it first). Unavailable backends are skipped (recorded
    with their reason) when skip_unavailable.
    """
    from hypothesis import given, settings

    from .strategies import CI_SETTINGS, edge_cases, experts_cases, route_cases

    results: list[dict] = []
    ci = settings(CI_SETTINGS, max_examples=max_examples)
    route_strategy = route_cases(routing)
    experts_strategy = experts_cases(routing)

    for backend in backends:
        subject = resolve(backend)
        stages = subject.stages()
        ok, why = backend_available(subject, device)
        if not ok:
            if not skip_unavailable:
                raise RuntimeError(f"kernels {subject.name} unavailable on {device}: {why}")
            results.append({"op": "*", "backend": subject.name, "device": device, "skipped": why})
            continue
        t0 = time.perf_counter()

        @ci
        @given(route_strategy)
        def _route(case):
            results.append(check_route(case, backend=subject, device=device))

        @ci
        @given(experts_strategy)
        def _perm(case):
            results.append(check_permutation(case, backend=subject, device=device))

        why_route = subject.unsupported_routing(routing) if routing is not None else None
        if "route" in stages and why_route:
            results.append({"op": "route", "backend": subject.name, "device": device, "skipped": why_route})
        elif "route" in stages:
            _route()
            from .strategies import route_edge_cases

            for case in route_edge_cases(routing):  # an extreme bias offset (BUGS.md #33)
                results.append(check_route(case, backend=subject, device=device))
        if "permute" in stages:
            _perm()
        for dtype in dtypes:
            ok, why = backend_available(subject, device, dtype)
            if not ok:
                results.append({"op": "*", "backend": subject.name, "dtype": _dtype_name(dtype),
                                "device": device, "skipped": why})
                continue

            @ci
            @given(experts_strategy)
            def _combine(case):
                results.append(check_combine(case, backend=subject, dtype=dtype, device=device))

            for stage in ("experts", "fused_moe"):
                if stage not in stages:
                    continue
                edges = edge_cases(routing)
                # shapes are covered in the first dtype; later dtypes re-check the two skewed loads
                for case in edges if dtype == dtypes[0] else edges[1:3]:
                    results.append(check_experts(case, backend=subject, dtype=dtype, device=device, stage=stage))

                def drawn(stage):
                    @ci
                    @given(experts_strategy)
                    def run(case):
                        results.append(check_experts(case, backend=subject, dtype=dtype, device=device, stage=stage))
                    return run

                drawn(stage)()
            if "combine" in stages and "permute" in stages:
                _combine()
        results.append({"op": "*", "backend": subject.name, "device": device, "stages": list(stages),
                        "seconds": time.perf_counter() - t0})
    return results
