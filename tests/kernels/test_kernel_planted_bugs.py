"""Planted kernel bugs: each must make a check fail with a message that names the case.

Bugs are planted by monkeypatching the kernels' helper functions or swapping in a buggy
Triton kernel, never by flags in the production code. Each test asserts that the check
raises, what the message names (op, shape, dtype, backend, the tensor and element), and for
numeric bugs that the error is at least 10x the gate (the check is not marginal).
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from moe_conformance.kernel_checks import checks
from moe_conformance.native.kernels import torch_backend
from moe_conformance.kernel_checks.strategies import ExpertsCase, RouteCase, RoutingConfig

FP32 = torch.float32
CASE = ExpertsCase(7, 19, 13, 6, 3, "some_empty", seed=3)
GROUPED = RoutingConfig("sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5, has_correction_bias=True)


def names_case(msg, op, case, dtype, backend):
    assert f"[{op}]" in msg, msg
    assert case.describe() in msg, msg  # every shape field: T=.. H=.. I=.. E=.. K=..
    assert f"dtype={str(dtype).replace('torch.', '')}" in msg, msg
    assert f"backend={backend}" in msg, msg


def lifted_error(monkeypatch, fn, *args, **kwargs):
    """The check's worst scaled error with every gate lifted."""
    with monkeypatch.context() as m:
        m.setattr(checks, "GATES", {k: math.inf for k in checks.GATES})
        return fn(*args, **kwargs)["max_error"]


@pytest.fixture
def triton_moe(require):
    require("triton")
    from moe_conformance.native.kernels import triton_moe

    return triton_moe


# ------------------------------------------------------------ 1. low-precision combine


def _bf16_accumulating_combine(y_sorted, slot_rows, weights):
    T, K = weights.shape
    y = y_sorted[slot_rows].view(T, K, y_sorted.shape[-1])
    acc = torch.zeros(T, y.shape[-1], dtype=torch.bfloat16, device=y.device)
    for k in range(K):
        acc = acc + (y[:, k].float() * weights[:, k, None].float()).to(torch.bfloat16)
    return acc.float()


def test_bf16_accumulation_of_the_topk_combine_is_caught(monkeypatch, device):
    monkeypatch.setattr(torch_backend, "_combine", _bf16_accumulating_combine)
    with pytest.raises(AssertionError) as err:
        checks.check_combine(CASE, backend="torch", dtype=FP32, device=device)
    msg = str(err.value)
    names_case(msg, "combine", CASE, FP32, "torch")
    assert "out (run 1) worst element (" in msg and "gate" in msg
    assert lifted_error(monkeypatch, checks.check_combine, CASE, backend="torch", dtype=FP32,
                        device=device) > 10 * checks.gate_for("combine", FP32)
    # the same bug inside the whole experts op is caught too
    with pytest.raises(AssertionError, match=r"\[experts\].*out \(run 1\) worst element"):
        checks.check_experts(CASE, backend="torch", dtype=FP32, device=device)


@triton.jit
def _fp16_accumulating_combine_kernel(
    y_ptr, slot_rows_ptr, weights_ptr, out_ptr, T, H, stride_y, stride_out,
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = tokens < T
    mask = t_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float16)  # the bug: a 16-bit accumulator
    for k in tl.static_range(TOP_K):
        rows = tl.load(slot_rows_ptr + tokens * TOP_K + k, mask=t_ok, other=0)
        y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            y = y * tl.load(weights_ptr + tokens * TOP_K + k, mask=t_ok, other=0.0)[:, None]
        acc += y.to(tl.float16)
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def test_fp16_accumulating_triton_combine_kernel_is_caught(monkeypatch, device, triton_moe):
    monkeypatch.setattr(triton_moe, "_combine_kernel", _fp16_accumulating_combine_kernel)
    with pytest.raises(AssertionError) as err:
        checks.check_combine(CASE, backend="triton", dtype=FP32, device=device)
    names_case(str(err.value), "combine", CASE, FP32, "triton")
    assert lifted_error(monkeypatch, checks.check_combine, CASE, backend="triton", dtype=FP32,
                        device=device) > 10 * checks.gate_for("combine", FP32)


# ----------------------------------------------------------- 2. uninitialized output row


def test_unwritten_grouped_gemm_row_is_caught_by_poisoning(monkeypatch, device, triton_moe):
    original = triton_moe._tile_map

    def last_row_dropped(offsets, num_rows, block_m):
        expert, start, end = original(offsets, num_rows, block_m)
        last = int(torch.nonzero(end > start).max())
        end = end.clone()
        end[last] -= 1  # the last sorted row is never computed nor written
        return expert, start, end

    monkeypatch.setattr(triton_moe, "_tile_map", last_row_dropped)
    with pytest.raises(AssertionError) as err:
        checks.check_experts(CASE, backend="triton", dtype=FP32, device=device)
    msg = str(err.value)
    names_case(msg, "experts", CASE, FP32, "triton")
    assert "out (run 1) worst element (" in msg and "got nan" in msg


# ------------------------------------------------------------ 3. off-by-one in offsets


def _one_row_late(offsets):
    """Every interior expert boundary one row late. Clamped to the row count: an unclamped
    off-by-one reads past the end of the index buffers, which crashes the interpreter (and is
    an illegal address on a GPU) before any check can report it."""
    shifted = offsets.clone()
    shifted[1:-1] = torch.clamp(shifted[1:-1] + 1, max=int(offsets[-1]))
    return shifted


def test_off_by_one_expert_offsets_is_caught(monkeypatch, device, triton_moe):
    original = triton_moe.permute_triton

    def shifted(indices, num_experts):
        perm = original(indices, num_experts)
        return perm._replace(offsets=_one_row_late(perm.offsets))

    monkeypatch.setattr(triton_moe, "permute_triton", shifted)
    with pytest.raises(AssertionError) as err:
        checks.check_permutation(CASE, backend="triton", device=device)
    msg = str(err.value)
    names_case(msg, "permute", CASE, torch.int64, "triton")
    assert "offsets (run 1) element (1,)" in msg
    with pytest.raises(AssertionError) as err:
        checks.check_experts(CASE, backend="triton", dtype=FP32, device=device)
    names_case(str(err.value), "experts", CASE, FP32, "triton")
    assert lifted_error(monkeypatch, checks.check_experts, CASE, backend="triton", dtype=FP32,
                        device=device) > 10 * checks.gate_for("experts", FP32)


def test_hypothesis_check_set_finds_and_names_a_planted_bug(monkeypatch, device, triton_moe):
    original = triton_moe.permute_triton

    def shifted(indices, num_experts):
        perm = original(indices, num_experts)
        return perm._replace(offsets=_one_row_late(perm.offsets))

    monkeypatch.setattr(triton_moe, "permute_triton", shifted)
    with pytest.raises(AssertionError, match=r"\[permute\] T=\d+ H=\d+ I=\d+ E=\d+ K=\d+ .*backend=triton"):
        checks.run_kernel_checks(GROUPED, backends=("triton",), dtypes=(FP32,), device=device)


# ------------------------------------------------------- 4. dropped router-weight grad


def test_dropped_router_weight_gradient_is_caught(monkeypatch, device, triton_moe):
    original = triton_moe.TritonExperts.backward

    def no_weight_grad(ctx, dout):
        grads = list(original(ctx, dout))
        grads[2] = torch.zeros_like(grads[2])  # loss still right, router never learns
        return tuple(grads)

    monkeypatch.setattr(triton_moe.TritonExperts, "backward", staticmethod(no_weight_grad))
    with pytest.raises(AssertionError) as err:
        checks.check_experts(CASE, backend="triton", dtype=FP32, device=device)
    msg = str(err.value)
    names_case(msg, "experts", CASE, FP32, "triton")
    assert "grad_weights (run 1) worst element (" in msg and "got 0," in msg
    assert lifted_error(monkeypatch, checks.check_experts, CASE, backend="triton", dtype=FP32,
                        device=device) > 10 * checks.gate_for("experts", FP32)


def test_detached_routing_weights_in_torch_backend_is_caught(monkeypatch, device):
    original = torch_backend.moe_experts_torch
    monkeypatch.setattr(torch_backend, "moe_experts_torch",
                        lambda x, i, w, *ws: original(x, i, w.detach(), *ws))
    with pytest.raises(AssertionError, match=r"\[experts\] T=7 H=19 .*grad_weights is None"):
        checks.check_experts(CASE, backend="torch", dtype=FP32, device=device)


# ---------------------------------------------------------- 5. wrong group score


def test_group_score_from_top1_instead_of_top2_sum_is_caught(monkeypatch, device):
    case = RouteCase(12, 20, 4, GROUPED, seed=0)
    checks.check_route(case, backend="torch", device=device)  # passes before planting
    monkeypatch.setattr(torch_backend, "_group_scores", lambda choice: choice.max(dim=-1).values)
    with pytest.raises(AssertionError) as err:
        checks.check_route(case, backend="torch", device=device)
    msg = str(err.value)
    assert "[route] T=12 E=20 K=4 [sigmoid norm=True scale=2.5 groups=2/4 +bias]" in msg
    assert "backend=torch" in msg and "dtype=float32" in msg
    assert "indices (sorted per token, run 1" in msg and "element (" in msg


# ------------------------------------------------------ 6. bias leaking into the weights


def test_correction_bias_in_the_weights_is_caught(monkeypatch, device):
    case = RouteCase(12, 20, 4, GROUPED, seed=1)
    monkeypatch.setattr(torch_backend, "_gather_weights", lambda scores, choice, idx: choice.gather(1, idx))
    with pytest.raises(AssertionError) as err:
        checks.check_route(case, backend="torch", device=device)
    msg = str(err.value)
    assert case.describe() in msg and "backend=torch" in msg
    assert "weights (run 1) worst element (" in msg
    assert lifted_error(monkeypatch, checks.check_route, case, backend="torch",
                        device=device) > 10 * checks.gate_for("route", FP32)


# --------------------------------------------- 7. state left over from the first pass


def test_state_left_from_the_first_pass_is_caught_by_the_second_run(monkeypatch, device):
    carried = {}

    def combine_reusing_a_buffer(y_sorted, slot_rows, weights):
        # accumulates into a cached buffer that is zero only the first time
        out = torch_backend_combine(y_sorted, slot_rows, weights)
        key = tuple(out.shape)
        if key not in carried:
            carried[key] = torch.zeros_like(out)
        carried[key] = carried[key] + out.detach()
        return out - out.detach() + carried[key]

    torch_backend_combine = torch_backend._combine
    monkeypatch.setattr(torch_backend, "_combine", combine_reusing_a_buffer)
    with pytest.raises(AssertionError) as err:
        checks.check_experts(CASE, backend="torch", dtype=FP32, device=device)
    msg = str(err.value)
    names_case(msg, "experts", CASE, FP32, "torch")
    assert "out (run 2) worst element" in msg  # run 1 passed
