"""Grouped GEMMs of the expert MLP, rows gathered by index inside the kernel.

    gate_up:  for each tile of slots s owned by expert e (see permute.py):
                  p = sorted_pair[s]; r = row_ids[p]
                  h = hidden[r] @ w13[e].T + b13[e]           # [BLOCK_M, 2*BLOCK_N] in fp32
                  act[s] = ACT(h[:, gate], h[:, up])           # stored in act's dtype
    down:     for each tile of slots s owned by expert e:
                  out[sorted_pair[s]] = act[s] @ w2[e].T + b2[e]   # rows land in pair order

PAIR_MODE (decode): no sort at all; program m is pair m, its expert read from expert_ids, and
the product is a matrix-vector one on the CUDA cores (one row gains nothing from tensor cores
and the kernel is bound by streaming the weights). The act buffer is then in pair order.
USE_PDL (pair mode, GPU): the down kernel is a programmatic dependent launch; gate_up lets it
start early, and each down program loads its first weight tile before waiting for gate_up to
finish, so the two weight streams overlap instead of paying a launch gap and a tail between them.

Weights are [E, N, K] with K contiguous (w13: N = 2I, K = H; w2: N = H, K = I). Padding
pairs (expert -1) and padding slots are never loaded or stored.

Quantized weights (W_FMT, see epmoe/quant.py) are dequantized tile by tile in registers and
multiplied in the activation dtype (weight-only: the point is fewer bytes streamed at decode):
    1 fp8:       w = data * scale[e]                        (one fp32 scale per expert or tensor)
    2 fp8_block: w = data * scale[e, n // 128, k // 128]
    3 nvfp4:     w = e2m1(nibble) * scale_e4m3[e, n, k // 16] * global[e]
Scale strides of broadcast (size-1) dims are 0.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ACT_SILU = 0
ACT_GELU = 1
ACT_SWIGLU_CLAMPED = 2


@triton.jit
def _activation(g, u, ACT: tl.constexpr, limit, alpha):
    """fp32 gate/up -> fp32 activation (see epmoe.experts.activation.activate)."""
    if ACT == 0:
        return g * tl.sigmoid(g) * u
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
    else:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return (u + 1.0) * g * tl.sigmoid(alpha * g)


@triton.jit
def _e2m1(code):
    """uint8 e2m1 code (0..15, bit 3 = sign) -> fp32 value in {0, 0.5, 1, 1.5, 2, 3, 4, 6} * sign."""
    c = code.to(tl.int32)
    ex = (c >> 1) & 3
    man = (c & 1).to(tl.float32)
    pow2 = (1 << tl.maximum(ex - 1, 0)).to(tl.float32)
    mag = tl.where(ex == 0, man * 0.5, (1.0 + man * 0.5) * pow2)
    return tl.where((c & 8) != 0, -mag, mag)


@triton.jit
def _load_wq(w_base, s_base, g_base, rows, k0, K, stride_wn, stride_sn, stride_sk,
             W_FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized fp32 weight tile [rows, BLOCK_K] of one expert (w_base/s_base/g_base point at it)."""
    r_ok = rows >= 0
    rows64 = tl.maximum(rows, 0).to(tl.int64)
    k = k0 + tl.arange(0, BLOCK_K)
    m = r_ok[:, None] & (k < K)[None, :]
    if W_FMT == 3:
        kh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        b = tl.load(w_base + rows64[:, None] * stride_wn + kh[None, :],
                    mask=r_ok[:, None] & (kh * 2 < K)[None, :], other=0)
        v = tl.reshape(tl.join(_e2m1(b & 15), _e2m1(b >> 4)), [rows.shape[0], BLOCK_K])
        sc = tl.load(s_base + rows64[:, None] * stride_sn + (k // 16)[None, :] * stride_sk, mask=m, other=0.0)
        return v * sc.to(tl.float32) * tl.load(g_base)
    w = tl.load(w_base + rows64[:, None] * stride_wn + k[None, :], mask=m, other=0.0).to(tl.float32)
    if W_FMT == 1:
        return w * tl.load(s_base)
    sc = tl.load(s_base + (rows64 // 128)[:, None] * stride_sn + (k // 128)[None, :] * stride_sk, mask=m, other=0.0)
    return w * sc


@triton.jit
def _tile_ids(num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (m tile, n tile), GROUP_M m tiles walked together for L2 reuse."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _rows(pid_m, expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E,
          PAIR_MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, slots [BLOCK_M], pairs [BLOCK_M], valid [BLOCK_M]) of m tile `pid_m`; expert < 0: none."""
    if PAIR_MODE:
        slots = pid_m + tl.arange(0, BLOCK_M)  # BLOCK_M == 1
        e = tl.load(expert_ids_ptr + pid_m)
        e = tl.where(e < E, e, -1)
        valid = slots == pid_m
        pairs = slots
    else:
        slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        e = tl.load(block_expert_ptr + pid_m)
        end = tl.load(expert_end_ptr + tl.maximum(e, 0))
        valid = (slots < end) & (e >= 0)
        pairs = tl.load(sorted_pair_ptr + slots, mask=valid, other=0)
    return e, slots, pairs, valid


@triton.jit
def moe_gate_up_kernel(
    x_ptr, stride_xm,  # hidden [N_rows, K]
    w_ptr, stride_we, stride_wn,  # w13 [E, 2*I, K]
    w_desc,  # W_TMA: tensor descriptor of w13, block [1, BLOCK_N, BLOCK_K]
    s_ptr, stride_se, stride_sn, stride_sk, g_ptr, stride_ge,  # W_FMT > 0: scales, global scale
    b_ptr, stride_be,  # b13 [E, 2*I] fp32 (HAS_BIAS)
    act_ptr, stride_am,  # act [slots, I]
    row_ids_ptr, expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr,
    num_m, E, I, K, limit, alpha,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, PAIR_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    W_TMA: tl.constexpr, USE_PDL: tl.constexpr, W_FMT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_m, num_n, GROUP_M)
    e, slots, pairs, valid = _rows(pid_m, expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E,
                                   PAIR_MODE, BLOCK_M)
    if e < 0:
        return
    rows = tl.load(row_ids_ptr + pairs, mask=valid, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = s_ptr + e.to(tl.int64) * stride_se
    g_base = g_ptr + e.to(tl.int64) * stride_ge
    rows_g = tl.where(n_ok, offs_n, -1)  # weight rows of the gate and up halves (-1: none)
    rows_u = tl.where(n_ok, I + offs_n, -1)
    if PAIR_MODE:
        x_row = x_ptr + tl.max(rows, axis=0) * stride_xm
        wg_ptrs = w_base + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        # elementwise fp32 partial sums, reduced over k once after the loop: the loop is loads
        # and FMAs only, so the next tile's loads issue without waiting on a reduction
        part_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        part_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(x_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if W_FMT == 0:
                wmask = n_ok[:, None] & k_ok[None, :]
                wg = tl.load(wg_ptrs + k0, mask=wmask, other=0.0).to(tl.float32)
                wu = tl.load(wg_ptrs + I * stride_wn + k0, mask=wmask, other=0.0).to(tl.float32)
            else:
                wg = _load_wq(w_base, s_base, g_base, rows_g, k0, K, stride_wn, stride_sn, stride_sk, W_FMT, BLOCK_K)
                wu = _load_wq(w_base, s_base, g_base, rows_u, k0, K, stride_wn, stride_sn, stride_sk, W_FMT, BLOCK_K)
            part_g += wg * a[None, :]
            part_u += wu * a[None, :]
        acc_g = tl.sum(part_g, axis=1)[None, :]
        acc_u = tl.sum(part_u, axis=1)[None, :]
    else:
        a_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        wg_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            if W_FMT != 0:
                wg = tl.trans(_load_wq(w_base, s_base, g_base, rows_g, k0, K, stride_wn, stride_sn, stride_sk,
                                       W_FMT, BLOCK_K).to(a.dtype))
                wu = tl.trans(_load_wq(w_base, s_base, g_base, rows_u, k0, K, stride_wn, stride_sn, stride_sk,
                                       W_FMT, BLOCK_K).to(a.dtype))
            elif W_TMA:  # the bulk copy engine zero-fills past K and past 2I; gate columns past I are never stored
                wg = tl.trans(w_desc.load([e, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
                wu = tl.trans(w_desc.load([e, I + pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
            else:
                wmask = k_ok[:, None] & n_ok[None, :]
                wg = tl.load(wg_ptrs + k0, mask=wmask, other=0.0)
                wu = tl.load(wg_ptrs + I * stride_wn + k0, mask=wmask, other=0.0)
            acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PREC)
            acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PREC)
    if HAS_BIAS:
        b_base = b_ptr + e.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + offs_n, mask=n_ok, other=0.0)[None, :]
        acc_u += tl.load(b_base + I + offs_n, mask=n_ok, other=0.0)[None, :]
    h = _activation(acc_g, acc_u, ACT, limit, alpha)
    act_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_am + offs_n[None, :]
    tl.store(act_ptrs, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def moe_down_kernel(
    act_ptr, stride_am,  # act [slots, K]
    w_ptr, stride_we, stride_wn,  # w2 [E, N, K]
    w_desc,  # W_TMA: tensor descriptor of w2, block [1, BLOCK_N, BLOCK_K]
    s_ptr, stride_se, stride_sn, stride_sk, g_ptr, stride_ge,  # W_FMT > 0: scales, global scale
    b_ptr, stride_be,  # b2 [E, N] fp32 (HAS_BIAS)
    out_ptr, stride_om,  # out [M, N] in pair order
    expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr,
    num_m, E, N, K,
    HAS_BIAS: tl.constexpr, PAIR_MODE: tl.constexpr, DOT_PREC: tl.constexpr, W_TMA: tl.constexpr,
    USE_PDL: tl.constexpr, W_FMT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_m, num_n, GROUP_M)
    e, slots, pairs, valid = _rows(pid_m, expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E,
                                   PAIR_MODE, BLOCK_M)
    if e < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = s_ptr + e.to(tl.int64) * stride_se
    g_base = g_ptr + e.to(tl.int64) * stride_ge
    rows_w = tl.where(n_ok, offs_n, -1)
    if PAIR_MODE:
        a_row = act_ptr + pid_m.to(tl.int64) * stride_am
        w_ptrs = w_base + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
        # first k tile peeled: its weights do not depend on gate_up, so they load before the wait
        k_ok = offs_k < K
        if W_FMT == 0:
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        else:
            w = _load_wq(w_base, s_base, g_base, rows_w, 0, K, stride_wn, stride_sn, stride_sk, W_FMT, BLOCK_K)
        if USE_PDL:
            gdc_wait()
        a = tl.load(a_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        part = w * a[None, :]
        for k0 in range(BLOCK_K, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            if W_FMT == 0:
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            else:
                w = _load_wq(w_base, s_base, g_base, rows_w, k0, K, stride_wn, stride_sn, stride_sk, W_FMT, BLOCK_K)
            part += w * a[None, :]
        acc = tl.sum(part, axis=1)[None, :]
    else:
        if USE_PDL:
            gdc_wait()
        a_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            if W_FMT != 0:
                w = tl.trans(_load_wq(w_base, s_base, g_base, rows_w, k0, K, stride_wn, stride_sn, stride_sk,
                                      W_FMT, BLOCK_K).to(a.dtype))
            elif W_TMA:
                w = tl.trans(w_desc.load([e, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
            else:
                w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e.to(tl.int64) * stride_be + offs_n, mask=n_ok, other=0.0)[None, :]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])
