"""Grouped GEMMs of the expert MLP, rows gathered by index inside the kernel (design: docs/kernels.md).

    gate_up:  for each tile of slots s owned by expert e (see permute.py):
                  p = sorted_pair[s]; r = row_ids[p]
                  h = hidden[r] @ w13[e].T + b13[e]           # [BLOCK_M, 2*BLOCK_N] in fp32
                  act[s] = ACT(h[:, gate], h[:, up])           # stored in act's dtype
    down:     for each tile of slots s owned by expert e:
                  out[sorted_pair[s]] = act[s] @ w2[e].T + b2[e]   # rows land in pair order

Weights are [E, N, K], K contiguous (w13: N = 2I, K = H; w2: N = H, K = I); scale strides of
broadcast dims are 0. Padding pairs (expert -1) and padding slots are never loaded or stored.
W_FMT (epmoe/quant.py): 0 float; 1 fp8: w = data * scale[e]; 2 fp8_block: w = data * scale[e, n // 128,
k // 128]; 3 nvfp4: w = e2m1(nibble) * scale_e4m3[e, n, k // 16] * global[e].
PAIR_MODE (decode): program m is pair m, no sort, act in pair order; matrix-vector products on the
CUDA cores, weights dequantized in registers. USE_PDL (pair mode): down is a programmatic
dependent launch that loads its first weight tile before gdc_wait().
A_FP8 (sorted fp8 / fp8_block): w8a8, e4m3 rows with one fp32 scale per row and 128 values, BLOCK_K
128; gate_up's epilogue (BLOCK_N 128) quantizes act the same way:
    s[m] = max(amax_n |act[m, n]|, EPS) / 448;  act_q[m, n] = e4m3(act[m, n] / s[m])
Sorted nvfp4: tiles dequantized exactly to the activation dtype, two dots (even / odd k), global
scale on the accumulator. W_GLOBAL: weights pre-dequantized by nvfp4_dequant_kernel (W_FMT 0),
global scale in the epilogue. e_lo, e_hi: only experts e_lo <= e < e_hi, from w_ptr at (e - e_lo) * stride_we.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from epmoe.kernels.quant import e4m3_groups


@triton.jit
def _activation(g, u, ACT: tl.constexpr, limit, alpha):
    """fp32 gate/up -> fp32 activation; ACT: ops.grouped_gemm.ACT_CODES (0 silu, 1 gelu, 2 swiglu_clamped)."""
    if ACT == 0:
        return g * tl.sigmoid(g) * u
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)) * u
    else:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return (u + 1.0) * g * tl.sigmoid(alpha * g)


@triton.jit
def _e2m1_scaled(code):
    """uint8 e2m1 code (bit 3 = sign) -> fp32 e2m1 * 2^-14, exact, via an fp16 bit pattern (sign -> bit 15,
    exponent -> bits 10-11, mantissa -> bit 9); callers fold 2^14 into the scale."""
    c = code.to(tl.uint16)
    return (((c & 8) << 12) | ((c & 7) << 9)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_pairs_asm(b):
    """uint8 bytes -> (even, odd) bf16 e2m1 values of their low / high nibbles, exact (sm_90 PTX): `prmt`
    spreads 4 bytes over two bf16 pairs, shifts and masks put each nibble's bits (e1 e0 m) on bf16 bits 8-6
    and its sign on bit 15 (= e2m1 * 2^-126), one mul.bf16x2 by 2^126 restores the value: ~3.4
    instructions per value against ~9 for converting an fp16 pattern per nibble."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t0, t1, m, s, bias;
        mov.b32 bias, 0x7E807E80;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        shl.b32 m, t0, 6;  shl.b32 s, t0, 12; and.b32 m, m, 0x01C001C0; and.b32 s, s, 0x80008000;
        or.b32 m, m, s;  mul.rn.bf16x2 $0, m, bias;
        shl.b32 m, t1, 6;  shl.b32 s, t1, 12; and.b32 m, m, 0x01C001C0; and.b32 s, s, 0x80008000;
        or.b32 m, m, s;  mul.rn.bf16x2 $1, m, bias;
        shl.b32 m, t0, 2;  shl.b32 s, t0, 8;  and.b32 m, m, 0x01C001C0; and.b32 s, s, 0x80008000;
        or.b32 m, m, s;  mul.rn.bf16x2 $2, m, bias;
        shl.b32 m, t1, 2;  shl.b32 s, t1, 8;  and.b32 m, m, 0x01C001C0; and.b32 s, s, 0x80008000;
        or.b32 m, m, s;  mul.rn.bf16x2 $3, m, bias;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[b],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


@triton.jit
def _e2m1_pairs(b, FAST_E2M1: tl.constexpr):
    """uint8 bytes -> (even, odd) e2m1 values of their low and high nibbles, exact: bf16 through PTX
    (FAST_E2M1, GPU), else fp32 through fp16 bit patterns (the interpreter runs no PTX)."""
    if FAST_E2M1:
        return _e2m1_pairs_asm(b)
    else:
        return _e2m1_scaled(b & 15) * 16384.0, _e2m1_scaled(b >> 4) * 16384.0


@triton.jit
def _load_nvfp4(w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk, FAST_E2M1: tl.constexpr,
                BLOCK_K: tl.constexpr, DTYPE: tl.constexpr):
    """nvfp4 tile of `rows` [R] (-1: none) at k0 as (even, odd) [R, BLOCK_K // 2] in DTYPE: values at k0 + 2j
    and k0 + 2j + 1 times their e4m3 block scale (exact: at most 5 significant bits; global scale is the
    caller's). K, BLOCK_K % 16 == 0; bytes load as [R, G, 8] (one block per row of 8) so the scale broadcasts."""
    G: tl.constexpr = BLOCK_K // 16
    R: tl.constexpr = rows.shape[0]
    r_ok = rows >= 0
    rows64 = tl.maximum(rows, 0).to(tl.int64)
    grp = k0 // 16 + tl.arange(0, G)  # [G] blocks along k
    ok = r_ok[:, None] & (grp * 16 < K)[None, :]  # [R, G]
    byte = grp[:, None] * 8 + tl.arange(0, 8)[None, :]  # [G, 8]
    b = tl.load(w_base + rows64[:, None, None] * stride_wn + byte[None, :, :], mask=ok[:, :, None], other=0)
    sc = tl.load(s_base + rows64[:, None] * stride_sn + grp[None, :] * stride_sk, mask=ok, other=0.0)
    sc = sc.to(tl.float32)[:, :, None]
    even, odd = _e2m1_pairs(b, FAST_E2M1)
    even = (even.to(tl.float32) * sc).to(DTYPE)
    odd = (odd.to(tl.float32) * sc).to(DTYPE)
    return tl.reshape(even, [R, BLOCK_K // 2]), tl.reshape(odd, [R, BLOCK_K // 2])


@triton.jit
def nvfp4_dequant_kernel(w_ptr, stride_we, stride_wn, s_ptr, stride_se, stride_sn, stride_sk, out_ptr, stride_oe,
                         stride_on, e_lo, N, K, FAST_E2M1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[e - e_lo, n, k] = e2m1(w[e, n, k]) * scale_e4m3[e, n, k // 16], e = e_lo + program_id(1), exact in
    out's dtype (the global scale is the GEMM epilogue's). Axis 0: [BLOCK_N, BLOCK_K] tiles."""
    e = e_lo + tl.program_id(1)
    num_k = tl.cdiv(K, BLOCK_K)
    n0 = (tl.program_id(0) // num_k) * BLOCK_N
    k0 = (tl.program_id(0) % num_k) * BLOCK_K
    offs_n = n0 + tl.arange(0, BLOCK_N)
    rows = tl.where(offs_n < N, offs_n, -1)
    even, odd = _load_nvfp4(w_ptr + e.to(tl.int64) * stride_we, s_ptr + e.to(tl.int64) * stride_se, rows, k0, K,
                            stride_wn, stride_sn, stride_sk, FAST_E2M1, BLOCK_K, out_ptr.dtype.element_ty)
    w = tl.reshape(tl.join(even, odd), [BLOCK_N, BLOCK_K])  # values back in k order
    offs_k = k0 + tl.arange(0, BLOCK_K)
    o = out_ptr + (e - e_lo).to(tl.int64) * stride_oe + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(o, w, mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _nvfp4_matvec_step(x_row, w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk,
                       FAST_E2M1: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pair-mode nvfp4 k step: fp32 [R, BLOCK_K // 16] = scale[r, blk] * sum_{i < 16} e2m1(w[r, 16 blk + i]) *
    x[16 blk + i]; [R, G, 8]-byte tiles keep a block in one thread, so the scale multiplies once per block."""
    G: tl.constexpr = BLOCK_K // 16
    r_ok = rows >= 0
    rows64 = tl.maximum(rows, 0).to(tl.int64)
    grp = k0 // 16 + tl.arange(0, G)  # [G] blocks along k
    ok = r_ok[:, None] & (grp * 16 < K)[None, :]  # [R, G]
    j = tl.arange(0, 8)
    byte = grp[:, None] * 8 + j[None, :]  # [G, 8]
    b = tl.load(w_base + rows64[:, None, None] * stride_wn + byte[None, :, :], mask=ok[:, :, None], other=0)
    # x as (even, odd) pairs, one 4-byte load each, split in registers
    xk = 2 * byte[:, :, None] + tl.arange(0, 2)[None, None, :]  # [G, 8, 2]
    xe, xo = tl.split(tl.load(x_row + xk, mask=(grp * 16 < K)[:, None, None], other=0.0).to(tl.float32))
    xe = xe[None, :, :]  # [1, G, 8]
    xo = xo[None, :, :]
    even, odd = _e2m1_pairs(b, FAST_E2M1)
    dot = tl.sum(even.to(tl.float32) * xe + odd.to(tl.float32) * xo, axis=2)  # [R, G]
    sc = tl.load(s_base + rows64[:, None] * stride_sn + grp[None, :] * stride_sk, mask=ok, other=0.0)
    return dot * sc.to(tl.float32)


@triton.jit
def _load_w8(w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk, W_FMT: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 weight tile [R, BLOCK_K] of `rows` (-1: none): floats as stored, fp8_block times its block scale
    (BLOCK_K divides 128), fp8 unscaled (the per-expert scale is the caller's)."""
    r_ok = rows >= 0
    rows64 = tl.maximum(rows, 0).to(tl.int64)
    k = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(w_base + rows64[:, None] * stride_wn + k[None, :], mask=r_ok[:, None] & (k < K)[None, :],
                other=0.0).to(tl.float32)
    if W_FMT == 2:
        w = w * tl.load(s_base + (rows64 // 128) * stride_sn + (k0 // 128) * stride_sk)[:, None]
    return w


@triton.jit
def _fp8_block_matvec_step(x_row, w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk, BLOCK_K: tl.constexpr):
    """Pair-mode fp8_block k step, elementwise: fp32 [R, BLOCK_K // 128, 128] = w[r, k] * scale[r // 128,
    k // 128] * x[k] (a block per axis-1 entry, so its scale broadcasts)."""
    G: tl.constexpr = BLOCK_K // 128
    r_ok = rows >= 0
    rows64 = tl.maximum(rows, 0).to(tl.int64)
    grp = k0 // 128 + tl.arange(0, G)  # [G]
    k = grp[:, None] * 128 + tl.arange(0, 128)[None, :]  # [G, 128]
    k_ok = k < K
    w = tl.load(w_base + rows64[:, None, None] * stride_wn + k[None, :, :], mask=r_ok[:, None, None] & k_ok[None],
                other=0.0).to(tl.float32)
    x = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)[None, :, :]
    sc = tl.load(s_base + (rows64 // 128)[:, None] * stride_sn + grp[None, :] * stride_sk,
                 mask=r_ok[:, None] & (grp * 128 < K)[None, :], other=0.0)
    return w * sc[:, :, None] * x


@triton.jit
def _matvec(x_row, w_base, s_base, g_base, rows, K, stride_wn, stride_sn, stride_sk,
            W_FMT: tl.constexpr, WAIT: tl.constexpr, FAST_E2M1: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pair mode: fp32 [R] = W[rows, :] . x, products summed elementwise and reduced once after the loop
    (loads and FMAs only in it). WAIT: gdc_wait() after the first weight tile's load (PDL)."""
    R: tl.constexpr = rows.shape[0]
    if W_FMT == 3:
        if WAIT:
            gdc_wait()
        part = tl.zeros([R, BLOCK_K // 16], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            part += _nvfp4_matvec_step(x_row, w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk,
                                       FAST_E2M1, BLOCK_K)
        return tl.sum(part, axis=1) * tl.load(g_base)
    elif W_FMT == 2:
        if WAIT:
            gdc_wait()
        part3 = tl.zeros([R, BLOCK_K // 128, 128], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            part3 += _fp8_block_matvec_step(x_row, w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk,
                                            BLOCK_K)
        return tl.sum(tl.sum(part3, axis=2), axis=1)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        part = tl.zeros([R, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = _load_w8(w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk, W_FMT, BLOCK_K)
            if WAIT and k0 == 0:
                gdc_wait()
            x = tl.load(x_row + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
            part += w * x[None, :]
        acc = tl.sum(part, axis=1)
        if W_FMT == 1:
            acc = acc * tl.load(s_base)
        return acc


@triton.jit
def _fp8_scales(as_ptrs, stride_asg, valid, s_base, n0, rows, k0, K, stride_sn, stride_sk,
                W_FMT: tl.constexpr, W_UNIFORM: tl.constexpr):
    """(row [BLOCK_M], column [BLOCK_N]) scales of the w8a8 k step at k0: a_s[m] of the step's 128 values;
    fp8_block with W_UNIFORM (tile rows in one 128-row scale block) folds the weight scale into the row
    scale, else the column scale is the rows' block scale. fp8: column scale unused (per-expert scale is
    the caller's). k0 past K (the last prefetch) reads the last group."""
    kg = tl.minimum(k0, K - 1) // 128
    a_s = tl.load(as_ptrs + kg * stride_asg, mask=valid, other=0.0)
    w_s = a_s  # unused unless fp8_block with mixed scale blocks
    if W_FMT == 2:
        if W_UNIFORM:
            a_s = a_s * tl.load(s_base + (n0 // 128) * stride_sn + kg * stride_sk)
        else:
            w_s = tl.load(s_base + (tl.maximum(rows, 0).to(tl.int64) // 128) * stride_sn + kg * stride_sk)
    return a_s, w_s


@triton.jit
def _mma_fp8(acc, a_ptrs, valid, w_ptrs, w_desc, e, n0, rows, k0, K, a_s, w_s, W_FMT: tl.constexpr, W_TMA: tl.constexpr,
             W_UNIFORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w8a8 k step: acc + dot(a, w) * a_s[:, None] (* w_s[None, :]), a: e4m3 [BLOCK_M, 128], w: e4m3 [128,
    BLOCK_N]. Scales come a step ahead (a scale loaded in its own step stalled after every MMA); e4m3-typed
    pointers let pipelined tiles feed the MMA from shared memory (bitcast bytes went through registers)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
    if W_TMA:
        w = tl.trans(w_desc.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))
    else:
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & (rows >= 0)[None, :], other=0.0)
    if W_FMT == 2 and not W_UNIFORM:
        # scale after the dot: a [BLOCK_M, BLOCK_N] scale matrix formed before it stays live (registers)
        return acc + tl.dot(a, w) * a_s[:, None] * w_s[None, :]
    return acc + tl.dot(a, w) * a_s[:, None]


@triton.jit
def _mma_nvfp4(acc, x_ptrs, valid, w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk,
               DOT_PREC: tl.constexpr, FAST_E2M1: tl.constexpr, BLOCK_K: tl.constexpr):
    """nvfp4 k step on the tensor cores: acc + a_even @ w_even.T + a_odd @ w_odd.T (global scale: the caller's)."""
    j = tl.arange(0, BLOCK_K // 2)
    m = valid[:, None] & (k0 + 2 * j < K)[None, :]
    xe = tl.load(x_ptrs + k0 + 2 * j[None, :], mask=m, other=0.0)
    xo = tl.load(x_ptrs + k0 + 2 * j[None, :] + 1, mask=m, other=0.0)
    even, odd = _load_nvfp4(w_base, s_base, rows, k0, K, stride_wn, stride_sn, stride_sk, FAST_E2M1, BLOCK_K, xe.dtype)
    acc = tl.dot(xe, tl.trans(even), acc, input_precision=DOT_PREC)
    return tl.dot(xo, tl.trans(odd), acc, input_precision=DOT_PREC)


@triton.jit
def _store_fp8_rows(act_ptr, stride_am, as_ptr, stride_asm, h, slots, offs_n, valid, n_ok, pid_n, EPS):
    """Store act rows h [BLOCK_M, 128] (one group) as e4m3 with one scale per row (e4m3_groups)."""
    bits, s = e4m3_groups(tl.where(valid[:, None] & n_ok[None, :], h, 0.0), EPS)  # [BLOCK_M, 128], [BLOCK_M]
    slots64 = slots.to(tl.int64)
    tl.store(act_ptr + slots64[:, None] * stride_am + offs_n[None, :], bits.to(tl.float8e4nv, bitcast=True),
             mask=valid[:, None] & n_ok[None, :])
    tl.store(as_ptr + slots64 * stride_asm + pid_n, s, mask=valid)


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
        # not (slots < end) & (e >= 0): a scalar int1 splat is no mask in Triton 3.9's interpreter
        valid = tl.where(e >= 0, slots < end, False)
        pairs = tl.load(sorted_pair_ptr + slots, mask=valid, other=0)
    return e, slots, pairs, valid


@triton.jit
def moe_gate_up_kernel(
    x_ptr, stride_xm,  # hidden [N_rows, K] (A_FP8: e4m3)
    xs_ptr, stride_xsm, stride_xsg,  # A_FP8: fp32 scales of hidden per (row, 128 values)
    w_ptr, stride_we, stride_wn,  # w13 [E, 2*I, K]
    w_desc,  # W_TMA: tensor descriptor of w13, block [1, BLOCK_N, BLOCK_K]
    s_ptr, stride_se, stride_sn, stride_sk, g_ptr, stride_ge,  # W_FMT > 0: scales, global scale
    b_ptr, stride_be,  # b13 [E, 2*I] fp32 (HAS_BIAS)
    act_ptr, stride_am,  # act [slots, I] (A_FP8: e4m3)
    acts_ptr, stride_asm,  # A_FP8: fp32 scales of act per (slot, 128 values)
    row_ids_ptr, expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr,
    num_m, E, e_lo, e_hi, I, K, limit, alpha, EPS,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, PAIR_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
    W_TMA: tl.constexpr, USE_PDL: tl.constexpr, W_FMT: tl.constexpr, A_FP8: tl.constexpr,
    W_UNIFORM: tl.constexpr, FAST_E2M1: tl.constexpr, W_GLOBAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    if USE_PDL:
        gdc_launch_dependents()
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_m, num_n, GROUP_M)
    e, slots, pairs, valid = _rows(pid_m, expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E,
                                   PAIR_MODE, BLOCK_M)
    if (e < e_lo) | (e >= e_hi):  # padding (-1) or another chunk's expert
        return
    rows = tl.load(row_ids_ptr + pairs, mask=valid, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + (e - e_lo).to(tl.int64) * stride_we
    s_base = s_ptr + e.to(tl.int64) * stride_se
    g_base = g_ptr + e.to(tl.int64) * stride_ge
    rows_g = tl.where(n_ok, offs_n, -1)  # weight rows of the gate and up halves (-1: none)
    rows_u = tl.where(n_ok, I + offs_n, -1)
    if PAIR_MODE:
        x_row = x_ptr + tl.max(rows, axis=0) * stride_xm
        if W_FMT == 0:
            wg_ptrs = w_base + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
            # elementwise partial sums, reduced after the loop: next loads issue without waiting on a reduction
            part_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            part_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + offs_k) < K
                a = tl.load(x_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                wmask = n_ok[:, None] & k_ok[None, :]
                wg = tl.load(wg_ptrs + k0, mask=wmask, other=0.0).to(tl.float32)
                wu = tl.load(wg_ptrs + I * stride_wn + k0, mask=wmask, other=0.0).to(tl.float32)
                part_g += wg * a[None, :]
                part_u += wu * a[None, :]
            acc_g = tl.sum(part_g, axis=1)[None, :]
            acc_u = tl.sum(part_u, axis=1)[None, :]
        else:
            acc_g = _matvec(x_row, w_base, s_base, g_base, rows_g, K, stride_wn, stride_sn, stride_sk,
                            W_FMT, False, FAST_E2M1, BLOCK_K)[None, :]
            acc_u = _matvec(x_row, w_base, s_base, g_base, rows_u, K, stride_wn, stride_sn, stride_sk,
                            W_FMT, False, FAST_E2M1, BLOCK_K)[None, :]
    else:
        a_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        wg_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if A_FP8:  # w8a8: BLOCK_K == 128, one activation scale per row and k step
            as_ptrs = xs_ptr + rows * stride_xsm
            n0_g = pid_n * BLOCK_N
            n0_u = I + pid_n * BLOCK_N
            sa_g, sw_g = _fp8_scales(as_ptrs, stride_xsg, valid, s_base, n0_g, rows_g, 0, K, stride_sn, stride_sk,
                                     W_FMT, W_UNIFORM)
            sa_u, sw_u = _fp8_scales(as_ptrs, stride_xsg, valid, s_base, n0_u, rows_u, 0, K, stride_sn, stride_sk,
                                     W_FMT, W_UNIFORM)
            for k0 in range(0, K, BLOCK_K):
                na_g, nw_g = _fp8_scales(as_ptrs, stride_xsg, valid, s_base, n0_g, rows_g, k0 + BLOCK_K, K,
                                         stride_sn, stride_sk, W_FMT, W_UNIFORM)
                na_u, nw_u = _fp8_scales(as_ptrs, stride_xsg, valid, s_base, n0_u, rows_u, k0 + BLOCK_K, K,
                                         stride_sn, stride_sk, W_FMT, W_UNIFORM)
                acc_g = _mma_fp8(acc_g, a_ptrs, valid, wg_ptrs, w_desc, e, n0_g, rows_g, k0, K, sa_g, sw_g,
                                 W_FMT, W_TMA, W_UNIFORM, BLOCK_N, BLOCK_K)
                acc_u = _mma_fp8(acc_u, a_ptrs, valid, wg_ptrs + I * stride_wn, w_desc, e, n0_u, rows_u, k0, K,
                                 sa_u, sw_u, W_FMT, W_TMA, W_UNIFORM, BLOCK_N, BLOCK_K)
                sa_g, sw_g, sa_u, sw_u = na_g, nw_g, na_u, nw_u
            if W_FMT == 1:
                acc_g *= tl.load(s_base)
                acc_u *= tl.load(s_base)
        elif W_FMT == 3:
            x_ptrs = x_ptr + rows[:, None] * stride_xm
            for k0 in range(0, K, BLOCK_K):
                acc_g = _mma_nvfp4(acc_g, x_ptrs, valid, w_base, s_base, rows_g, k0, K, stride_wn, stride_sn,
                                   stride_sk, DOT_PREC, FAST_E2M1, BLOCK_K)
                acc_u = _mma_nvfp4(acc_u, x_ptrs, valid, w_base, s_base, rows_u, k0, K, stride_wn, stride_sn,
                                   stride_sk, DOT_PREC, FAST_E2M1, BLOCK_K)
            acc_g *= tl.load(g_base)
            acc_u *= tl.load(g_base)
        else:
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + offs_k) < K
                a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
                if W_TMA:  # zero-filled past K and 2I; gate columns past I never stored; descriptor from e_lo
                    wg = tl.trans(w_desc.load([e - e_lo, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
                    wu = tl.trans(w_desc.load([e - e_lo, I + pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
                else:
                    wmask = k_ok[:, None] & n_ok[None, :]
                    wg = tl.load(wg_ptrs + k0, mask=wmask, other=0.0)
                    wu = tl.load(wg_ptrs + I * stride_wn + k0, mask=wmask, other=0.0)
                acc_g = tl.dot(a, wg, acc_g, input_precision=DOT_PREC)
                acc_u = tl.dot(a, wu, acc_u, input_precision=DOT_PREC)
            if W_GLOBAL:  # nvfp4 dequantized to scratch: its global scale
                acc_g *= tl.load(g_base)
                acc_u *= tl.load(g_base)
    if HAS_BIAS:
        b_base = b_ptr + e.to(tl.int64) * stride_be
        acc_g += tl.load(b_base + offs_n, mask=n_ok, other=0.0)[None, :]
        acc_u += tl.load(b_base + I + offs_n, mask=n_ok, other=0.0)[None, :]
    h = _activation(acc_g, acc_u, ACT, limit, alpha)
    if A_FP8:  # BLOCK_N == 128: this program's columns are one activation group
        _store_fp8_rows(act_ptr, stride_am, acts_ptr, stride_asm, h, slots, offs_n, valid, n_ok, pid_n, EPS)
    else:
        act_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_am + offs_n[None, :]
        tl.store(act_ptrs, h.to(act_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def moe_down_kernel(
    act_ptr, stride_am,  # act [slots, K] (A_FP8: e4m3)
    acts_ptr, stride_asm,  # A_FP8: fp32 scales of act per (slot, 128 values)
    w_ptr, stride_we, stride_wn,  # w2 [E, N, K]
    w_desc,  # W_TMA: tensor descriptor of w2, block [1, BLOCK_N, BLOCK_K]
    s_ptr, stride_se, stride_sn, stride_sk, g_ptr, stride_ge,  # W_FMT > 0: scales, global scale
    b_ptr, stride_be,  # b2 [E, N] fp32 (HAS_BIAS)
    out_ptr, stride_om,  # out [M, N] in pair order
    expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr,
    num_m, E, e_lo, e_hi, N, K,
    HAS_BIAS: tl.constexpr, PAIR_MODE: tl.constexpr, DOT_PREC: tl.constexpr, W_TMA: tl.constexpr,
    USE_PDL: tl.constexpr, W_FMT: tl.constexpr, A_FP8: tl.constexpr, W_UNIFORM: tl.constexpr,
    FAST_E2M1: tl.constexpr, W_GLOBAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_ids(num_m, num_n, GROUP_M)
    e, slots, pairs, valid = _rows(pid_m, expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E,
                                   PAIR_MODE, BLOCK_M)
    if (e < e_lo) | (e >= e_hi):  # padding (-1) or another chunk's expert
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_base = w_ptr + (e - e_lo).to(tl.int64) * stride_we
    s_base = s_ptr + e.to(tl.int64) * stride_se
    g_base = g_ptr + e.to(tl.int64) * stride_ge
    rows_w = tl.where(n_ok, offs_n, -1)
    if PAIR_MODE:
        a_row = act_ptr + pid_m.to(tl.int64) * stride_am
        if W_FMT == 0:
            w_ptrs = w_base + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
            # first k tile peeled: its weights do not depend on gate_up, so they load before the wait
            k_ok = offs_k < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            if USE_PDL:
                gdc_wait()
            a = tl.load(a_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            part = w * a[None, :]
            for k0 in range(BLOCK_K, K, BLOCK_K):
                k_ok = (k0 + offs_k) < K
                a = tl.load(a_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                part += w * a[None, :]
            acc = tl.sum(part, axis=1)[None, :]
        else:
            acc = _matvec(a_row, w_base, s_base, g_base, rows_w, K, stride_wn, stride_sn, stride_sk,
                          W_FMT, USE_PDL, FAST_E2M1, BLOCK_K)[None, :]
    else:
        if USE_PDL:
            gdc_wait()
        a_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if A_FP8:
            as_ptrs = acts_ptr + slots.to(tl.int64) * stride_asm
            n0 = pid_n * BLOCK_N
            sa, sw = _fp8_scales(as_ptrs, 1, valid, s_base, n0, rows_w, 0, K, stride_sn, stride_sk, W_FMT, W_UNIFORM)
            for k0 in range(0, K, BLOCK_K):
                na, nw = _fp8_scales(as_ptrs, 1, valid, s_base, n0, rows_w, k0 + BLOCK_K, K, stride_sn, stride_sk,
                                     W_FMT, W_UNIFORM)
                acc = _mma_fp8(acc, a_ptrs, valid, w_ptrs, w_desc, e, n0, rows_w, k0, K, sa, sw, W_FMT, W_TMA,
                               W_UNIFORM, BLOCK_N, BLOCK_K)
                sa, sw = na, nw
            if W_FMT == 1:
                acc *= tl.load(s_base)
        elif W_FMT == 3:
            x_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_am
            for k0 in range(0, K, BLOCK_K):
                acc = _mma_nvfp4(acc, x_ptrs, valid, w_base, s_base, rows_w, k0, K, stride_wn, stride_sn,
                                 stride_sk, DOT_PREC, FAST_E2M1, BLOCK_K)
            acc *= tl.load(g_base)
        else:
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + offs_k) < K
                a = tl.load(a_ptrs + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
                if W_TMA:
                    w = tl.trans(w_desc.load([e - e_lo, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K))
                else:
                    w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
            if W_GLOBAL:
                acc *= tl.load(g_base)
    if HAS_BIAS:
        acc += tl.load(b_ptr + e.to(tl.int64) * stride_be + offs_n, mask=n_ok, other=0.0)[None, :]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])
