"""Triton kernels for the MoE layer: routing, permutation, grouped GEMMs, combine.

This is the only module that imports triton; `moe_conformance.native.kernels` imports it lazily when
backend="triton" is asked for. On CPU the kernels run under TRITON_INTERPRET=1 (fp32/fp16
only: bf16 is wrong under the interpreter).

What is notable:
- Routing is one kernel: scores, selection-only bias, group-limited masking and the
  iterative top-k all happen in registers, in fp32, for a block of tokens. Ties go to the
  lower expert index.
- Permutation is a stable counting sort in three kernels (per-block histogram, per-expert
  prefix sum, per-block rank and scatter); nothing syncs with the host.
- The grouped GEMMs never materialise a permuted copy of x or of the output gradient: the A
  operand is gathered row by row from the token it belongs to ("fused permutation"). The
  gate and up projections share one kernel with SwiGLU in its epilogue ("fused activation"),
  and the backward of SwiGLU sits in the epilogue of the down-projection's data gradient.
- Work is split into row tiles that never straddle two experts. The tile -> (expert, rows)
  map is built on the device by one kernel over an upper bound of the tile count
  (ceil(S / BLOCK_M) + E), so launches need no host sync; surplus programs return at once.
- The top-k combine (forward) and its backward (router-weight gradient) accumulate in fp32.
- Weight gradients of experts that got no rows are written as exact zeros.
- Every output is allocated through `_alloc.empty`, which the checks poison with NaN.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - exercised only without triton
    raise ImportError(
        "backend='triton' needs the 'triton' package (pip install triton); "
        f"importing it failed: {exc}"
    ) from exc

from . import _alloc
from .torch_backend import Permutation

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ============================================================================ routing


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, weights_ptr, indices_ptr,
    T, E, group_size, stride_t, routed_scaling,
    SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ptrs = logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :]
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
    # rows past T would be all -inf and make NaNs in the softmax; they are never stored
    logits = tl.where(row_ok[:, None], logits.to(tl.float32), 0.0)
    logits = tl.where(col_ok[None, :], logits, float("-inf"))

    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        shifted = tl.where(col_ok[None, :], shifted, 0.0)
        scores = shifted / tl.sum(shifted, axis=1)[:, None]
    scores = tl.where(col_ok[None, :], scores, 0.0)

    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(col_ok[None, :], choice, float("-inf"))

    if N_GROUP > 1:
        group_of_col = cols // group_size
        groups = tl.arange(0, BLOCK_G)
        group_scores = tl.full((BLOCK_T, BLOCK_G), float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            vals = tl.where((group_of_col == g)[None, :], choice, float("-inf"))
            best = tl.max(vals, axis=1)
            best_col = tl.min(tl.where(vals == best[:, None], cols[None, :], BLOCK_E), axis=1)
            second = tl.max(tl.where(cols[None, :] == best_col[:, None], float("-inf"), vals), axis=1)
            group_scores = tl.where((groups == g)[None, :], (best + second)[:, None], group_scores)
        kept = tl.zeros((BLOCK_T, BLOCK_G), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(group_scores, axis=1)
            pick = tl.min(tl.where(group_scores == best[:, None], groups[None, :], BLOCK_G), axis=1)
            hit = groups[None, :] == pick[:, None]
            kept = tl.where(hit, 1, kept)
            group_scores = tl.where(hit, float("-inf"), group_scores)
        col_kept = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
        for g in tl.static_range(N_GROUP):
            kept_g = tl.sum(tl.where((groups == g)[None, :], kept, 0), axis=1)
            col_kept = tl.where((group_of_col == g)[None, :], kept_g[:, None], col_kept)
        choice = tl.where(col_kept > 0, choice, float("-inf"))

    ks = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), tl.int64)
    for k in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)
        pick = tl.min(tl.where(choice == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = cols[None, :] == pick[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)
        top_w = tl.where((ks == k)[None, :], w[:, None], top_w)
        top_i = tl.where((ks == k)[None, :], pick.to(tl.int64)[:, None], top_i)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        top_w = top_w / (tl.sum(top_w, axis=1)[:, None] + 1e-20)
    top_w = top_w * routed_scaling

    out_mask = row_ok[:, None] & (ks < TOP_K)[None, :]
    out_off = rows[:, None].to(tl.int64) * TOP_K + ks[None, :]
    tl.store(weights_ptr + out_off, top_w, mask=out_mask)
    tl.store(indices_ptr + out_off, top_i, mask=out_mask)


def route_triton(
    router_logits, *, scoring, top_k, correction_bias, n_group, topk_group,
    norm_topk_prob, routed_scaling_factor,
):
    T, E = router_logits.shape
    logits = router_logits.contiguous()
    weights = _alloc.empty((T, top_k), dtype=torch.float32, device=logits.device)
    indices = _alloc.empty((T, top_k), dtype=torch.int64, device=logits.device)
    if T == 0:
        return weights, indices
    block_e = triton.next_power_of_2(E)
    # Keep the [BLOCK_T, BLOCK_E] tile near 4k elements so registers hold it on a GPU.
    block_t = max(1, min(64, 4096 // block_e, triton.next_power_of_2(T)))
    bias = correction_bias.contiguous() if correction_bias is not None else logits
    _route_kernel[(triton.cdiv(T, block_t),)](
        logits, bias, weights, indices,
        T, E, E // n_group, logits.stride(0), float(routed_scaling_factor),
        SIGMOID=scoring == "sigmoid", HAS_BIAS=correction_bias is not None,
        N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k, NORM=bool(norm_topk_prob),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_G=triton.next_power_of_2(n_group),
        BLOCK_K=triton.next_power_of_2(top_k),
    )
    return weights, indices


# ======================================================================== permutation
#
# A stable counting sort in four launches (a zero fill, then three kernels) instead of a chain
# of small torch ops: with the tile map, about 35 launches took 0.9 ms at 16k tokens on the H200,
# six take 0.2-0.3 ms; none of them has work enough to hide its launch.


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, totals_ptr, S, E, n_blocks,
                  BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    # counts[e, b] = slots of block b routed to expert e; totals[e] += that (totals start at 0)
    b = tl.program_id(0)
    slots = b * BLOCK_S + tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + slots, mask=slots < S, other=-1)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    e_ok = experts < E
    tl.store(counts_ptr + experts.to(tl.int64) * n_blocks + b, counts, mask=e_ok)
    tl.atomic_add(totals_ptr + experts, counts, mask=e_ok & (counts > 0))


@triton.jit
def _prefix_kernel(counts_ptr, totals_ptr, base_ptr, tokens_per_expert_ptr, offsets_ptr, E, n_blocks,
                   BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    # one program per expert: base[e, b] = first sorted row of expert e's slots in block b
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    totals = tl.load(totals_ptr + experts, mask=experts < E, other=0).to(tl.int64)
    before = tl.sum(tl.where(experts < e, totals, 0), axis=0)
    count = tl.sum(tl.where(experts == e, totals, 0), axis=0)
    tl.store(tokens_per_expert_ptr + e, count)
    tl.store(offsets_ptr + e + 1, before + count)
    if e == 0:
        tl.store(offsets_ptr, tl.zeros([], tl.int64))
    row = before
    for b0 in range(0, n_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        b_ok = blocks < n_blocks
        c = tl.load(counts_ptr + e * n_blocks + blocks, mask=b_ok, other=0).to(tl.int64)
        tl.store(base_ptr + e * n_blocks + blocks, row + tl.cumsum(c, axis=0) - c, mask=b_ok)
        row += tl.sum(c, axis=0)


@triton.jit
def _scatter_kernel(
    ids_ptr, base_ptr, slot_rows_ptr, sorted_slots_ptr, S, n_blocks, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    local = tl.arange(0, BLOCK_S)
    slots = b * BLOCK_S + local
    ok = slots < S
    ids = tl.load(ids_ptr + slots, mask=ok, other=-1)
    # rank of a slot among earlier slots of this block with the same expert: keeps the sort stable
    earlier_same = (ids[:, None] == ids[None, :]) & (local[None, :] < local[:, None])
    rank = tl.sum(earlier_same.to(tl.int64), axis=1)
    base = tl.load(base_ptr + ids.to(tl.int64) * n_blocks + b, mask=ok, other=0)
    rows = base + rank
    tl.store(slot_rows_ptr + slots, rows, mask=ok)
    tl.store(sorted_slots_ptr + rows, slots.to(tl.int64), mask=ok)


def permute_triton(indices_TK: torch.Tensor, num_experts: int) -> Permutation:
    device = indices_TK.device
    ids = indices_TK.reshape(-1).contiguous()
    S, E = ids.numel(), num_experts
    block_s = 16 if INTERPRET else 128
    block_e = triton.next_power_of_2(E)
    n_blocks = max(1, triton.cdiv(S, block_s))
    counts_EB = _alloc.empty((E, n_blocks), dtype=torch.int32, device=device)
    totals = torch.zeros(E, dtype=torch.int32, device=device)
    base_EB = _alloc.empty((E, n_blocks), dtype=torch.int64, device=device)
    tokens_per_expert = _alloc.empty((E,), dtype=torch.int64, device=device)
    offsets = _alloc.empty((E + 1,), dtype=torch.int64, device=device)
    slot_rows = _alloc.empty((S,), dtype=torch.int64, device=device)
    sorted_slots = _alloc.empty((S,), dtype=torch.int64, device=device)
    _count_kernel[(n_blocks,)](ids, counts_EB, totals, S, E, n_blocks, BLOCK_S=block_s, BLOCK_E=block_e)
    _prefix_kernel[(E,)](counts_EB, totals, base_EB, tokens_per_expert, offsets, E, n_blocks,
                         BLOCK_E=block_e, BLOCK_B=min(1024, triton.next_power_of_2(n_blocks)))
    if S > 0:
        _scatter_kernel[(n_blocks,)](ids, base_EB, slot_rows, sorted_slots, S, n_blocks, BLOCK_S=block_s)
    return Permutation(tokens_per_expert, offsets, sorted_slots, slot_rows)


# ============================================================================ combine


@triton.jit
def _scaled_rows(src_ptr, idx_ptr, scale_ptr, at, at_ok, cols, mask, stride_src,
                 GATHER: tl.constexpr, SCALE: tl.constexpr):
    """fp32 [len(at), len(cols)] block of scale[at] * src[idx[at]] (src[at] without GATHER,
    unscaled without SCALE): the row loop shared by the combine and the gather kernels."""
    if GATHER:
        src_rows = tl.load(idx_ptr + at, mask=at_ok, other=0).to(tl.int64)
    else:
        src_rows = at
    v = tl.load(src_ptr + src_rows[:, None] * stride_src + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if SCALE:
        v = v * tl.load(scale_ptr + at, mask=at_ok, other=0.0).to(tl.float32)[:, None]
    return v


@triton.jit
def _combine_kernel(
    y_ptr, slot_rows_ptr, weights_ptr, out_ptr, T, H, stride_y, stride_out,
    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_ok = tokens < T
    mask = t_ok[:, None] & (cols < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
    for k in tl.static_range(TOP_K):
        acc += _scaled_rows(y_ptr, slot_rows_ptr, weights_ptr, tokens * TOP_K + k, t_ok, cols, mask,
                            stride_y, True, HAS_WEIGHTS)
    tl.store(out_ptr + tokens[:, None] * stride_out + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _row_blocks(T: int, H: int):
    """(BLOCK_T, BLOCK_H) for the per-token kernels: wide rows on a GPU, few programs on CPU."""
    if INTERPRET:
        return min(16, triton.next_power_of_2(max(T, 1))), min(64, triton.next_power_of_2(H))
    return 1, min(1024, triton.next_power_of_2(H))


def combine_triton(y_sorted_SH, perm: Permutation, weights_TK, out_dtype=None, *, top_k=None):
    """out[t] = sum_k weights[t,k] * y_sorted[slot_rows[t*K+k]] (weights None: plain sum)."""
    K = weights_TK.shape[1] if weights_TK is not None else top_k
    T = perm.slot_rows.numel() // K
    H = y_sorted_SH.shape[1]
    out = _alloc.empty((T, H), dtype=out_dtype or y_sorted_SH.dtype, device=y_sorted_SH.device)
    if T == 0:
        return out
    block_t, block_h = _row_blocks(T, H)
    w = weights_TK.contiguous() if weights_TK is not None else y_sorted_SH
    _combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
        y_sorted_SH, perm.slot_rows, w, out, T, H, y_sorted_SH.stride(0), out.stride(0),
        TOP_K=K, HAS_WEIGHTS=weights_TK is not None, BLOCK_T=block_t, BLOCK_H=block_h,
    )
    return out


@triton.jit
def _weight_grad_kernel(
    dout_ptr, y_ptr, slot_rows_ptr, dw_ptr, T, H, stride_d, stride_y,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # d loss / d weights[t, k] = <dout[t], y_sorted[row(t, k)]>, in fp32
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_ok = tokens < T
    for k in tl.static_range(TOP_K):
        rows = tl.load(slot_rows_ptr + tokens * TOP_K + k, mask=t_ok, other=0)
        acc = tl.zeros((BLOCK_T, BLOCK_H), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = t_ok[:, None] & (cols < H)[None, :]
            d = tl.load(dout_ptr + tokens[:, None] * stride_d + cols[None, :], mask=mask, other=0.0)
            y = tl.load(y_ptr + rows[:, None] * stride_y + cols[None, :], mask=mask, other=0.0)
            acc += d.to(tl.float32) * y.to(tl.float32)
        tl.store(dw_ptr + tokens * TOP_K + k, tl.sum(acc, axis=1), mask=t_ok)


# ====================================================================== grouped GEMMs


@triton.jit
def _tile_map_kernel(offsets_ptr, expert_ptr, start_ptr, end_ptr, E, max_tiles, block_m,
                     BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    # program e < E writes expert e's tiles; program E marks the surplus tiles empty
    pid = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    e_ok = experts < E
    lo = tl.load(offsets_ptr + experts, mask=e_ok, other=0)
    hi = tl.load(offsets_ptr + experts + 1, mask=e_ok, other=0)
    tiles = (hi - lo + block_m - 1) // block_m
    first = tl.sum(tl.where(experts < pid, tiles, 0), axis=0)
    ts0 = tl.arange(0, BLOCK_T)
    if pid < E:
        n_tiles = tl.sum(tl.where(experts == pid, tiles, 0), axis=0)
        row0 = tl.load(offsets_ptr + pid)
        row_end = tl.load(offsets_ptr + pid + 1)
        for t0 in range(0, n_tiles, BLOCK_T):
            ts = t0 + ts0
            ok = (ts < n_tiles) & (first + ts < max_tiles)
            start = row0 + ts * block_m
            tl.store(expert_ptr + first + ts, tl.full([BLOCK_T], 0, tl.int32) + pid, mask=ok)
            tl.store(start_ptr + first + ts, start, mask=ok)
            tl.store(end_ptr + first + ts, tl.minimum(start + block_m, row_end), mask=ok)
    else:
        for t0 in range(first, max_tiles, BLOCK_T):
            ts = t0 + ts0
            ok = ts < max_tiles
            tl.store(expert_ptr + ts, tl.full([BLOCK_T], 0, tl.int32) + (E - 1), mask=ok)
            tl.store(start_ptr + ts, tl.zeros([BLOCK_T], tl.int64), mask=ok)
            tl.store(end_ptr + ts, tl.zeros([BLOCK_T], tl.int64), mask=ok)


def _tile_map(offsets: torch.Tensor, num_rows: int, block_m: int):
    """Row tiles that never straddle two experts, built on the device in one launch, no host sync.

    Returns (tile_expert, tile_start, tile_end) of length ceil(S/BLOCK_M) + E, an upper bound
    of the real tile count; surplus tiles get start == end and their programs return at once.
    """
    E = offsets.numel() - 1
    max_tiles = triton.cdiv(num_rows, block_m) + E
    dev = offsets.device
    expert = _alloc.empty((max_tiles,), dtype=torch.int32, device=dev)
    start = _alloc.empty((max_tiles,), dtype=torch.int64, device=dev)
    end = _alloc.empty((max_tiles,), dtype=torch.int64, device=dev)
    _tile_map_kernel[(E + 1,)](offsets, expert, start, end, E, max_tiles, block_m,
                               BLOCK_E=triton.next_power_of_2(E), BLOCK_T=256)
    return expert, start, end


@triton.jit
def _gate_up_kernel(
    x_ptr, row_token_ptr, wg_ptr, wu_ptr, gate_ptr, up_ptr, act_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr, num_tiles,
    N, K, stride_x, stride_we, stride_wn, stride_out,
    SAVE_GATE_UP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """act[r] = silu(x[tok(r)] @ w_gate[e].T) * (x[tok(r)] @ w_up[e].T) for sorted rows r."""
    # Grouped launch order: neighbouring programs share A rows and B columns, so both stay
    # in L2. (Inlined rather than a helper: nested jit calls are costly under the interpreter.)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    start = tl.load(tile_start_ptr + pid_m)
    end = tl.load(tile_end_ptr + pid_m)
    if start >= end:
        return
    e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    tok = tl.load(row_token_ptr + rows, mask=row_ok, other=0)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_ptrs = x_ptr + tok[:, None] * stride_x
    b_off = e * stride_we + ns[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptrs + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & n_ok[None, :]
        bg = tl.load(wg_ptr + b_off + ks[:, None], mask=b_mask, other=0.0)
        bu = tl.load(wu_ptr + b_off + ks[:, None], mask=b_mask, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, bu, acc_u, input_precision=PRECISION)
    out_off = rows[:, None].to(tl.int64) * stride_out + ns[None, :]
    out_mask = row_ok[:, None] & n_ok[None, :]
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + out_off, act.to(act_ptr.dtype.element_ty), mask=out_mask)
    if SAVE_GATE_UP:
        tl.store(gate_ptr + out_off, acc_g.to(gate_ptr.dtype.element_ty), mask=out_mask)
        tl.store(up_ptr + out_off, acc_u.to(up_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _rows_gemm_kernel(
    a_ptr, a2_ptr, row_token_ptr, row_scale_ptr, b_ptr, b2_ptr,
    c_ptr, c2_ptr, gate_ptr, up_ptr,
    tile_expert_ptr, tile_start_ptr, tile_end_ptr, num_tiles,
    N, K, stride_a, stride_be, stride_bn, stride_bk, stride_c,
    GATHER_A: tl.constexpr, SCALE_ROWS: tl.constexpr, DUAL: tl.constexpr,
    SWIGLU_BWD: tl.constexpr, PRECISION: tl.constexpr, SPLIT_DUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[r] = scale[r] * (A[src(r)] @ B[e]  (+ A2[r] @ B2[e] if DUAL)) over sorted rows r.

    B[e] is addressed as B[e, n, k] through (stride_be, stride_bn, stride_bk), which covers
    both w and w.T of an nn.Linear-layout expert weight. With SWIGLU_BWD the product is the
    gradient of act = silu(gate) * up and the epilogue writes d gate to c and d up to c2.
    """
    # Grouped launch order: neighbouring programs share A rows and B columns, so both stay
    # in L2. (Inlined rather than a helper: nested jit calls are costly under the interpreter.)
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    start = tl.load(tile_start_ptr + pid_m)
    end = tl.load(tile_end_ptr + pid_m)
    if start >= end:
        return
    e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    if GATHER_A:
        src = tl.load(row_token_ptr + rows, mask=row_ok, other=0)
    else:
        src = rows
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    a_rows = src[:, None].to(tl.int64) * stride_a
    a2_rows = rows[:, None].to(tl.int64) * stride_a
    b_off = e * stride_be + ns[None, :].to(tl.int64) * stride_bn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_mask = row_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
        b_ptrs = b_off + ks[:, None].to(tl.int64) * stride_bk
        a = tl.load(a_ptr + a_rows + ks[None, :], mask=a_mask, other=0.0)
        acc = tl.dot(a, tl.load(b_ptr + b_ptrs, mask=b_mask, other=0.0), acc, input_precision=PRECISION)
        if DUAL and not SPLIT_DUAL:
            a2 = tl.load(a2_ptr + a2_rows + ks[None, :], mask=a_mask, other=0.0)
            acc = tl.dot(a2, tl.load(b2_ptr + b_ptrs, mask=b_mask, other=0.0), acc, input_precision=PRECISION)
    if DUAL and SPLIT_DUAL:
        # the second product as its own loop: half the operand tiles in flight per stage, so
        # the pipeline can run deeper than with both products in one loop
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = k_ok[:, None] & n_ok[None, :]
            b_ptrs = b_off + ks[:, None].to(tl.int64) * stride_bk
            a2 = tl.load(a2_ptr + a2_rows + ks[None, :], mask=a_mask, other=0.0)
            acc = tl.dot(a2, tl.load(b2_ptr + b_ptrs, mask=b_mask, other=0.0), acc, input_precision=PRECISION)
    if SCALE_ROWS:
        acc = acc * tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_off = rows[:, None].to(tl.int64) * stride_c + ns[None, :]
    out_mask = row_ok[:, None] & n_ok[None, :]
    if SWIGLU_BWD:
        g = tl.load(gate_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + out_off, mask=out_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        d_gate = acc * u * sig * (1.0 + g * (1.0 - sig))
        d_up = acc * g * sig
        tl.store(c_ptr + out_off, d_gate.to(c_ptr.dtype.element_ty), mask=out_mask)
        tl.store(c2_ptr + out_off, d_up.to(c2_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(c_ptr + out_off, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _weight_gemm_kernel(
    g_ptr, g2_ptr, x_ptr, g_row_token_ptr, x_row_token_ptr,
    dw_ptr, dw2_ptr, offsets_ptr, N, K, stride_g, stride_x,
    GATHER_G: tl.constexpr, GATHER_X: tl.constexpr, DUAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[e, n, k] = sum over rows r of expert e of G[src_g(r), n] * X[src_x(r), k].

    One program per (expert, n tile, k tile); it walks the expert's rows. Experts with no
    rows store zeros, so their gradient is exactly zero. A row scale is folded into an operand
    beforehand (_wgrad_operands) rather than applied to a tile inside the loop, where the tile
    would have to pass through registers on its way to the tensor cores.
    """
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    num_k = tl.cdiv(K, BLOCK_K)
    ns = (pid // num_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = (pid % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        if GATHER_G:
            g_src = tl.load(g_row_token_ptr + rows, mask=row_ok, other=0)
        else:
            g_src = rows
        if GATHER_X:
            x_src = tl.load(x_row_token_ptr + rows, mask=row_ok, other=0)
        else:
            x_src = rows
        x = tl.load(x_ptr + x_src[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g_off = g_src[:, None].to(tl.int64) * stride_g + ns[None, :]
        g_mask = row_ok[:, None] & n_ok[None, :]
        g = tl.load(g_ptr + g_off, mask=g_mask, other=0.0)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
        if DUAL:
            g2 = tl.load(g2_ptr + g_off, mask=g_mask, other=0.0)
            acc2 = tl.dot(tl.trans(g2), x, acc2, input_precision=PRECISION)
    out_off = e * N * K + ns[:, None].to(tl.int64) * K + ks[None, :]
    out_mask = n_ok[:, None] & k_ok[None, :]
    tl.store(dw_ptr + out_off, acc.to(dw_ptr.dtype.element_ty), mask=out_mask)
    if DUAL:
        tl.store(dw2_ptr + out_off, acc2.to(dw2_ptr.dtype.element_ty), mask=out_mask)


# Block shapes. Under the interpreter every program costs ~1 ms of Python overhead, so tiles
# that cover a whole tiny test matrix in one program keep CPU checks fast; on a GPU these are
# tuned in benchmarks/gpu_moe_layer.py (its --breakdown mode times every kernel of the layer).
# Each GEMM kind has its own row tile (BLOCK_M); a plan builds one tile map per BLOCK_M used.
# (forward down projection: 128x256 beat 128x128 on 3 of 4 benchmark shapes, tied on the 4th)
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
# (gate/up: 128x128 beat 128x64 on DeepSeek-V3, 15.9 vs 17.0 ms at 16k tokens and 4.70 vs 5.06 at 4k,
# and lost 1-3% on Qwen3, H200 2026-12-02 16:05)
GPU_CONFIG_GATE_UP = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
# backward: d act = w * dout[tok] @ w_down (SwiGLU backward in the epilogue), and
# d x_sorted = d gate @ w_gate + d up @ w_up (SPLIT_DUAL: the two products one after the other)
GPU_CONFIG_DGRAD_ACT = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
GPU_CONFIG_DGRAD_X = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                          SPLIT_DUAL=True)
# weight gradients (BLOCK_M is the reduction step over an expert's rows): of five tile shapes on
# presorted operands, 64x128x256 was the fastest at 16k tokens (all three weight gradients:
# DeepSeek-V3 25.7 vs 30.2 ms for 64x128x128, Qwen3 2.72 vs 3.15) and tied at 4k (same run)
GPU_CONFIG_WGRAD = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=256, num_warps=8, num_stages=3)
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
INTERPRET_CONFIG_WGRAD = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
# Weight gradients: "triton" (_weight_gemm_kernel), "grouped_mm" (torch._grouped_mm over the
# sorted rows, CUDA bf16 only) or "auto": Triton for gate/up, and for down too unless the experts
# average WGRAD_GROUPED_MIN_ROWS rows or more. torch._grouped_mm used to win w_down's gradient at
# 512 rows/expert; with the row scale folded in before the GEMM and the operands presorted, Triton
# wins every weight gradient at every benchmark shape (H200, same run: DeepSeek-V3 at 16k tokens,
# w_down 8.6 vs 17.9 ms, w_gate+w_up 17.1 vs 34.4). MOE_TRITON_WGRAD overrides WGRAD.
WGRAD = "triton"
WGRAD_GROUPED_MIN_ROWS = 512
# torch._grouped_mm orientation: dW = G^T X (False) or dW = (X^T G)^T, the orientation autograd
# uses for torch._grouped_mm's own weight gradient (True; returns a transposed view, which made
# the whole layer's backward 1.4-3.5x slower on the H200)
WGRAD_GROUPED_T = False
# Triton weight gradients of gate and up: one launch with two accumulators (False) or two launches
# (True). Two 128x256 fp32 accumulators would take 256 registers a thread (the limit is 255), so the
# 64x128x256 tile needs two launches; at 64x128x128 on presorted operands one launch was faster (DeepSeek-V3
# at 16k tokens: 18.7 vs 20.2 ms), but slower than two launches at 64x128x256 (17.1)
WGRAD_SPLIT_DUAL = True
# Gather the token-indexed operand of a Triton weight gradient into sorted order first (one pass over
# S rows) instead of in the GEMM's loop: a row index loaded in the loop caps Triton's software
# pipeline at two buffers whatever num_stages says (TTGIR of triton 3.6 for sm_90). The pass costs
# less than it saves (DeepSeek-V3 at 16k tokens, 64x128x128 tiles: w_down 9.9 vs 11.2 ms, w_gate+w_up
# 20.2 vs 22.6), and the presorted operands allow the wider 64x128x256 tile above.
WGRAD_PRESORT = True

def _cfg(kind: str, dtype: torch.dtype) -> dict:
    if INTERPRET:
        cfg = dict(INTERPRET_CONFIG_WGRAD if kind == "wgrad" else INTERPRET_CONFIG)
        if kind == "dgrad_x":
            cfg["SPLIT_DUAL"] = False
        return cfg
    cfg = dict({"rows": GPU_CONFIG, "gate_up": GPU_CONFIG_GATE_UP, "dgrad_act": GPU_CONFIG_DGRAD_ACT,
                "dgrad_x": GPU_CONFIG_DGRAD_X, "wgrad": GPU_CONFIG_WGRAD}[kind])
    if dtype.itemsize == 4:
        # fp32 tiles take twice the shared memory of bf16 ones: halve the reduction step and
        # pipeline less deeply so every kernel fits Hopper's 227 KB
        cfg["num_stages"] = 2
        if kind == "wgrad":
            cfg["BLOCK_M"] = 32
        else:
            cfg["BLOCK_K"] = 32
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 128)
    return cfg


def _precision(dtype: torch.dtype):
    # fp32 must stay fp32 (the default would use tf32 on a GPU); 16-bit inputs take the default.
    return "ieee" if dtype == torch.float32 else None


class _Plan:
    """Everything the forward and backward share: the permutation and the row tiles."""

    def __init__(self, indices_TK, num_experts):
        T, K = indices_TK.shape
        self.T, self.K, self.E = T, K, num_experts
        self.perm = permute_triton(indices_TK, num_experts)
        self.S = T * K
        self.row_token = self.perm.sorted_slots // K
        self._tiles = {}

    def tiles(self, block_m):
        """(tile_expert, tile_start, tile_end), num_tiles for row tiles of block_m rows."""
        if block_m not in self._tiles:
            tiles = _tile_map(self.perm.offsets, self.S, block_m)
            self._tiles[block_m] = (tiles, tiles[0].numel())
        return self._tiles[block_m]


def _gate_up(plan, x_TH, w_gate_EIH, w_up_EIH, save_gate_up):
    cfg = _cfg("gate_up", x_TH.dtype)
    I, H = w_gate_EIH.shape[1:]
    dev, dt = x_TH.device, x_TH.dtype
    act = _alloc.empty((plan.S, I), dtype=dt, device=dev)
    gate = _alloc.empty((plan.S, I), dtype=dt, device=dev) if save_gate_up else act
    up = _alloc.empty((plan.S, I), dtype=dt, device=dev) if save_gate_up else act
    if plan.S == 0:
        return gate, up, act
    tiles, num_tiles = plan.tiles(cfg["BLOCK_M"])
    grid = (num_tiles * triton.cdiv(I, cfg["BLOCK_N"]),)
    _gate_up_kernel[grid](
        x_TH, plan.row_token, w_gate_EIH, w_up_EIH, gate, up, act, *tiles, num_tiles,
        I, H, x_TH.stride(0), w_gate_EIH.stride(0), w_gate_EIH.stride(1), act.stride(0),
        SAVE_GATE_UP=save_gate_up, PRECISION=_precision(dt), **cfg,
    )
    return gate, up, act


def _rows_gemm(plan, a, b_ENK_view, out_cols, *, out_dtype, gather=False, row_scale=None,
               a2=None, b2=None, swiglu=None, kind="rows"):
    """Launch _rows_gemm_kernel. b_ENK_view is (tensor, stride_e, stride_n, stride_k)."""
    b, sbe, sbn, sbk = b_ENK_view
    cfg = _cfg(kind, a.dtype)
    split = cfg.pop("SPLIT_DUAL", False)
    dev = a.device
    c = _alloc.empty((plan.S, out_cols), dtype=out_dtype, device=dev)
    c2 = _alloc.empty((plan.S, out_cols), dtype=out_dtype, device=dev) if swiglu else c
    if plan.S == 0:
        return (c, c2) if swiglu else c
    K = a.shape[1]
    gate, up = swiglu if swiglu else (c, c)
    tiles, num_tiles = plan.tiles(cfg["BLOCK_M"])
    grid = (num_tiles * triton.cdiv(out_cols, cfg["BLOCK_N"]),)
    _rows_gemm_kernel[grid](
        a, a2 if a2 is not None else a, plan.row_token,
        row_scale if row_scale is not None else a, b, b2 if b2 is not None else b,
        c, c2, gate, up, *tiles, num_tiles,
        out_cols, K, a.stride(0), sbe, sbn, sbk, c.stride(0),
        GATHER_A=gather, SCALE_ROWS=row_scale is not None, DUAL=a2 is not None,
        SWIGLU_BWD=swiglu is not None, PRECISION=_precision(a.dtype), SPLIT_DUAL=split, **cfg,
    )
    return (c, c2) if swiglu else c


@triton.jit
def _gather_rows_kernel(
    src_ptr, idx_ptr, scale_ptr, out_ptr, R, C, stride_src, stride_out,
    GATHER: tl.constexpr, SCALE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[r] = scale[r] * src[idx[r]] (src[r] without GATHER), the product in fp32."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_ok = rows < R
    mask = r_ok[:, None] & (cols < C)[None, :]
    v = _scaled_rows(src_ptr, idx_ptr, scale_ptr, rows, r_ok, cols, mask, stride_src, GATHER, SCALE)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=mask)


def _gather_rows(src, idx, scale):
    """One pass: the rows idx of src (all rows if idx is None), each times scale[r] if given."""
    R = idx.numel() if idx is not None else src.shape[0]
    C = src.shape[1]
    out = _alloc.empty((R, C), dtype=src.dtype, device=src.device)
    if R == 0 or C == 0:
        return out
    block_r, block_c = _row_blocks(R, C)
    block_r = block_r if INTERPRET else 4
    _gather_rows_kernel[(triton.cdiv(R, block_r), triton.cdiv(C, block_c))](
        src, idx if idx is not None else src, scale if scale is not None else src, out,
        R, C, src.stride(0), out.stride(0), GATHER=idx is not None, SCALE=scale is not None,
        BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _wgrad_operands(plan, g, x, *, gather_g, gather_x, row_scale, g2, presort):
    """(g, x, gather_g, gather_x) after the passes the weight GEMM wants over its operands first.

    The row scale is folded into one operand: the one that gets a pass anyway, else the one
    with fewer columns (one rounding to bf16 of an fp32 product either way), never g when a
    second g shares x. With presort, operands still indexed by token are gathered into sorted
    order (torch._grouped_mm needs that; the Triton kernel pipelines deeper without a gather)."""
    rows = plan.row_token
    pass_g, pass_x = presort and gather_g, presort and gather_x
    scale_g = row_scale is not None and g2 is None and (
        (pass_g and not pass_x) or (pass_g == pass_x and g.shape[1] < x.shape[1]))
    scale_x = row_scale is not None and not scale_g
    if pass_g or scale_g:
        g = _gather_rows(g, rows if gather_g else None, row_scale if scale_g else None)
        gather_g = False
    if pass_x or scale_x:
        x = _gather_rows(x, rows if gather_x else None, row_scale if scale_x else None)
        gather_x = False
    return g, x, gather_g, gather_x


def _grouped_wgrad(plan, g, x, *, out_dtype, g2):
    """The weight gradients on torch._grouped_mm (ragged over the sorted rows), for CUDA bf16,
    from operands in sorted order. Empty experts are zeroed with a device-side mask fill (no
    host sync)."""
    offs = plan.perm.offsets[1:].to(torch.int32)
    empty = (plan.perm.tokens_per_expert == 0)[:, None, None]  # an empty group's output is not promised
    outs = []
    for grad in (g, g2) if g2 is not None else (g,):
        if WGRAD_GROUPED_T:
            dw = torch._grouped_mm(x.t(), grad, offs=offs).transpose(1, 2)
        else:
            dw = torch._grouped_mm(grad.t(), x, offs=offs)
        if dw.dtype != out_dtype:
            dw = dw.to(out_dtype)
        outs.append(dw.masked_fill_(empty, 0))
    return tuple(outs) if g2 is not None else outs[0]


def _wgrad_backend(plan, x, which) -> str:
    """"grouped_mm" or "triton" for the weight gradient `which` ("down" or "gate_up")."""
    choice = os.environ.get("MOE_TRITON_WGRAD", WGRAD)
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return "triton"
    if choice == "auto":
        return "grouped_mm" if which == "down" and plan.S >= WGRAD_GROUPED_MIN_ROWS * plan.E else "triton"
    return choice


def _weight_gemm(plan, g, x, out_shape, *, out_dtype, gather_g=False, gather_x=False,
                 row_scale=None, g2=None):
    grouped = _wgrad_backend(plan, x, "gate_up" if g2 is not None else "down") == "grouped_mm"
    g, x, gather_g, gather_x = _wgrad_operands(
        plan, g, x, gather_g=gather_g, gather_x=gather_x, row_scale=row_scale, g2=g2,
        presort=grouped or (WGRAD_PRESORT and not INTERPRET))
    if grouped:
        try:
            return _grouped_wgrad(plan, g, x, out_dtype=out_dtype, g2=g2)
        except RuntimeError:  # alignment or an older torch: the Triton kernel computes it
            pass
    kw = dict(out_dtype=out_dtype, gather_g=gather_g, gather_x=gather_x)
    if g2 is not None and WGRAD_SPLIT_DUAL and not INTERPRET:
        return (_triton_wgrad(plan, g, x, out_shape, **kw), _triton_wgrad(plan, g2, x, out_shape, **kw))
    return _triton_wgrad(plan, g, x, out_shape, g2=g2, **kw)


def _triton_wgrad(plan, g, x, out_shape, *, out_dtype, gather_g=False, gather_x=False, g2=None):
    cfg = _cfg("wgrad", x.dtype)
    E, N, K = out_shape
    dw = _alloc.empty(out_shape, dtype=out_dtype, device=x.device)
    dw2 = _alloc.empty(out_shape, dtype=out_dtype, device=x.device) if g2 is not None else dw
    grid = (triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(K, cfg["BLOCK_K"]), E)
    _weight_gemm_kernel[grid](
        g, g2 if g2 is not None else g, x, plan.row_token, plan.row_token,
        dw, dw2, plan.perm.offsets, N, K, g.stride(0), x.stride(0),
        GATHER_G=gather_g, GATHER_X=gather_x, DUAL=g2 is not None, PRECISION=_precision(x.dtype), **cfg,
    )
    return (dw, dw2) if g2 is not None else dw


def _weight_grad(plan, dout_TH, y_sorted_SH):
    dw = _alloc.empty((plan.T, plan.K), dtype=torch.float32, device=dout_TH.device)
    if plan.T == 0:
        return dw
    H = dout_TH.shape[1]
    block_t, block_h = _row_blocks(plan.T, H)
    _weight_grad_kernel[(triton.cdiv(plan.T, block_t),)](
        dout_TH, y_sorted_SH, plan.perm.slot_rows, dw, plan.T, H,
        dout_TH.stride(0), y_sorted_SH.stride(0), TOP_K=plan.K, BLOCK_T=block_t, BLOCK_H=block_h)
    return dw


def _linear_view(w_ENK):
    """w[e] as B[e, n, k] = w[e, n, k]: computes a @ w[e].T (nn.Linear forward)."""
    return (w_ENK, w_ENK.stride(0), w_ENK.stride(1), w_ENK.stride(2))


def _transposed_view(w_ENK):
    """w[e] as B[e, n, k] = w[e, k, n]: computes a @ w[e] (nn.Linear input gradient)."""
    return (w_ENK, w_ENK.stride(0), w_ENK.stride(2), w_ENK.stride(1))


class TritonExperts(torch.autograd.Function):
    """out = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with Triton kernels."""

    @staticmethod
    def forward(ctx, x_TH, indices_TK, weights_TK, w_gate_EIH, w_up_EIH, w_down_EHI):
        x_TH = x_TH.contiguous()
        weights_TK = weights_TK.contiguous()
        w_gate_EIH, w_up_EIH, w_down_EHI = (w.contiguous() for w in (w_gate_EIH, w_up_EIH, w_down_EHI))
        E, I, H = w_gate_EIH.shape
        plan = _Plan(indices_TK, E)
        need_grad = any(ctx.needs_input_grad)
        gate, up, act = _gate_up(plan, x_TH, w_gate_EIH, w_up_EIH, save_gate_up=need_grad)
        y_sorted = _rows_gemm(plan, act, _linear_view(w_down_EHI), H, out_dtype=x_TH.dtype)
        out = combine_triton(y_sorted, plan.perm, weights_TK, x_TH.dtype)
        if need_grad:
            ctx.plan = plan
            ctx.save_for_backward(x_TH, weights_TK, w_gate_EIH, w_up_EIH, w_down_EHI,
                                  gate, up, act, y_sorted)
        return out

    @staticmethod
    def backward(ctx, dout_TH):
        x_TH, weights_TK, w_gate, w_up, w_down, gate, up, act, y_sorted = ctx.saved_tensors
        plan = ctx.plan
        E, I, H = w_gate.shape
        dout_TH = dout_TH.contiguous().to(x_TH.dtype)
        need_x, _, need_w, need_g, need_u, need_d = ctx.needs_input_grad
        d_weights = None
        if need_w:
            d_weights = _weight_grad(plan, dout_TH, y_sorted).to(weights_TK.dtype)
        w_sorted = weights_TK.reshape(-1)[plan.perm.sorted_slots].float()
        if need_x or need_g or need_u:
            # d act[r] = w[r] * dout[tok(r)] @ w_down[e]; the epilogue makes d gate and d up.
            d_gate, d_up = _rows_gemm(plan, dout_TH, _transposed_view(w_down), I,
                                      out_dtype=x_TH.dtype, gather=True, row_scale=w_sorted,
                                      swiglu=(gate, up), kind="dgrad_act")
        d_x = None
        if need_x:
            dx_sorted = _rows_gemm(plan, d_gate, _transposed_view(w_gate), H, out_dtype=x_TH.dtype,
                                   a2=d_up, b2=w_up, kind="dgrad_x")
            d_x = combine_triton(dx_sorted, plan.perm, None, x_TH.dtype, top_k=plan.K)
        d_w_down = None
        if need_d:
            d_w_down = _weight_gemm(plan, dout_TH, act, (E, H, I), out_dtype=w_down.dtype,
                                    gather_g=True, row_scale=w_sorted)
        d_w_gate = d_w_up = None
        if need_g or need_u:
            d_w_gate, d_w_up = _weight_gemm(plan, d_gate, x_TH, (E, I, H), out_dtype=w_gate.dtype,
                                            gather_x=True, g2=d_up)
        return d_x, None, d_weights, d_w_gate, d_w_up, d_w_down


def moe_experts_triton(x_TH, indices_TK, weights_TK, w_gate_EIH, w_up_EIH, w_down_EHI):
    return TritonExperts.apply(x_TH, indices_TK, weights_TK, w_gate_EIH, w_up_EIH, w_down_EHI)
