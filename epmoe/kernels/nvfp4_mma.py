"""nvfp4 expert GEMMs for a few rows per expert on the tensor cores (mma.sync m16n8k16), in Gluon.

    gate_up:  act[s, n] = ACT(x_s . w_gate[e, n] + b, x_s . w_up[e, n] + b),  x_s = hidden[row_ids[pair(s)]]
    down:     out[pair(s), n] = act[s] . w2[e, n] + b2[e, n]

    A  weights  [BLOCK_N, BLOCK_K] bf16  DotOperand(0, k_width=8), decoded in registers (_decode)
    B  rows     [BLOCK_K, NC] bf16       DotOperand(1, k_width=8), NC = max(8, BLOCK_M) columns
    C           [BLOCK_N, NC] fp32       the mma layout, warps along the weight rows

No shared memory, no barrier; the k order inside a tile is permuted alike in A and B so loads are
wide and the decode short (why and how: docs/kernels.md). The decode is exact (e2m1 * scale * 2^-62,
a normal bf16); the accumulator is multiplied by global * 2^62 at the end. Activations are bf16.
Rows: PAIR_MODE, program m is pair m (act in pair order); else BLOCK_M sorted slots of one expert
(kernels/permute.py; act in slot order). USE_PDL, PREFETCH: as in nvfp4_decode.py. EVEN_K: K % BLOCK_K
== 0, no k masks. Weight rows past N and unused columns read valid memory and are never stored.
NVIDIA GPUs only (mma.sync: sm_80 and newer; the runner uses them on Hopper).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from epmoe.kernels.nvfp4_decode import _activation, _pdl_launch_dependents, _pdl_wait

MMA_N = 8  # columns (activation rows) of one mma instruction


@gluon.constexpr_function
def _num_cols(block_m: int) -> int:
    """Columns of the B operand: the block's rows, at least one mma's eight."""
    return max(MMA_N, block_m)


def _decode_asm() -> str:
    """PTX: word $8 (eight e2m1, value j in nibble j) and scale byte $9 -> $0-$7, bf16 w * 2^-62 as four bf16x2
    pairs of nibbles _PAIR_ORDER: magnitude bits shifted onto bf16 bits 8-6 (= e2m1 * 2^-126), the scale on
    bits 10-4 (* 2^127 * 2^57 = scale * 2^64), one mul.bf16x2 per pair. ~21 instructions per eight values."""
    pair = ("shr.u32 t, {q}, 6;\nand.b32 t, t, 0x01C001C0;\nand.b32 o, {q}, 0x80008000;\nor.b32 o, o, t;\n"
            "mul.rn.bf16x2 o, o, m;\nmov.b32 {{${lo}, ${hi}}}, o;\n")
    asm = ("{\n.reg .b32 q, t, o, m, c;\nmul.lo.u32 m, $9, 0x00100010;\nmov.b32 c, 0x7F007F00;\n"
           "mul.rn.bf16x2 m, m, c;\nmov.b32 c, 0x5C005C00;\nmul.rn.bf16x2 m, m, c;\n")
    for i in range(4):  # pairs (3, 7), (2, 6), (1, 5), (0, 4): q moves up a nibble between them
        if i:
            asm += f"shl.b32 q, {'$8' if i == 1 else 'q'}, 4;\n"
        asm += pair.format(q="$8" if i == 0 else "q", lo=2 * i, hi=2 * i + 1)
    return asm + "}"


_DECODE_ASM = gl.constexpr(_decode_asm())
_PAIR_ORDER = (3, 7, 2, 6, 1, 5, 0, 4)  # nibble of each decoded value, in operand order
SCALE_BIAS = gl.constexpr(2.0**62)  # the accumulator's factor: w * 2^-62 went into the products


@gluon.constexpr_function
def _mma_layout(num_warps: int) -> gl.NVMMADistributedLayout:
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 8])


@gluon.constexpr_function
def _operand(index: int, num_warps: int) -> gl.DotOperandLayout:
    return gl.DotOperandLayout(operand_index=index, parent=_mma_layout(num_warps), k_width=8)


@gluon.constexpr_function
def _words_layout(block_n: int, per_thread: int, num_warps: int) -> gl.DistributedLinearLayout:
    """[BLOCK_N, 4, per_thread]: A operand rows (lanes g -> rows 0-7, a register -> row 8, warps -> 16-row
    slabs, registers -> further slabs), the four lanes t on dim 1, per_thread elements in registers."""
    slab = 16 * num_warps
    reg = ([[0, 0, 1 << i] for i in range(per_thread.bit_length() - 1)] + [[8, 0, 0]]
           + [[slab << i, 0, 0] for i in range((block_n // slab).bit_length() - 1)])
    lane = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp = [[16 << i, 0, 0] for i in range(num_warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg, lane, warp, [], [block_n, 4, per_thread])


@gluon.constexpr_function
def _acts_layout(per_thread: int, cols: int, num_warps: int) -> gl.DistributedLinearLayout:
    """[4, per_thread, 8, cols]: B in memory order: lanes t on dim 0, per_thread groups of eight values in
    registers, lanes g on the columns (further groups of eight in registers), every warp holding all of it."""
    reg = ([[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]] + [[0, 1 << i, 0, 0] for i in range(per_thread.bit_length() - 1)]
           + [[0, 0, 0, 8 << i] for i in range((cols // 8).bit_length() - 1)])
    lane = [[1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]]
    warp = [[0, 0, 0, 0]] * (num_warps.bit_length() - 1)
    return gl.DistributedLinearLayout(reg, lane, warp, [], [4, per_thread, 8, cols])


@gluon.jit
def _decode(w, s):
    """bf16 [R, 32 J] A operand of int32 words w [R, 4, J] and scales s [R, 4, J]: position 32 j + 8 t + i
    holds nibble _PAIR_ORDER[i] of w[:, t, j] (tile word t J + j) times its scale and 2^-62."""
    v0, v1, v2, v3, v4, v5, v6, v7 = gl.inline_asm_elementwise(
        _DECODE_ASM, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, s], dtype=(gl.bfloat16,) * 8, is_pure=True, pack=1)
    # join appends a minor dim: [R, 4, J, 2, 2, 2] with [.., p, q, r] = v[p + 2q + 4r]
    a = gl.join(gl.join(gl.join(v0, v1), gl.join(v2, v3)), gl.join(gl.join(v4, v5), gl.join(v6, v7)))
    a = gl.reshape(gl.permute(a, (0, 2, 1, 5, 4, 3)), [w.shape[0], w.shape[2] * 32])
    return gl.convert_layout(a, _operand(0, gl.num_warps()))


@gluon.jit
def _a_ptrs(w_base, s_base, n0, N, stride_wn, stride_sn, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """Pointers of words [BLOCK_N, 4, J] and scale bytes [BLOCK_N, 4, J / 2] of rows n0.. at k 0 (J = BLOCK_K /
    32; lane t reads words t J .. t J + J - 1: one vector load), and their word / block index (k masks)."""
    J: gl.constexpr = BLOCK_K // 32
    LW: gl.constexpr = _words_layout(BLOCK_N, J, gl.num_warps())
    LS: gl.constexpr = _words_layout(BLOCK_N, J // 2, gl.num_warps())
    rows = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LW))), N - 1)
    r = gl.expand_dims(gl.expand_dims(rows.to(gl.int64), 1), 2)  # rows past N: never stored
    t = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LW))), 0), 2)
    j = gl.expand_dims(gl.expand_dims(gl.arange(0, J, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW))), 0), 1)
    word = t * J + j
    rows_s = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, LS))), N - 1)
    r_s = gl.expand_dims(gl.expand_dims(rows_s.to(gl.int64), 1), 2)
    t_s = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, LS))), 0), 2)
    j_s = gl.expand_dims(gl.expand_dims(gl.arange(0, J // 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, LS))), 0), 1)
    block = t_s * (J // 2) + j_s
    return w_base + r * stride_wn + word, s_base + r_s * stride_sn + block, word, block


@gluon.jit
def _load_a(w_ptrs, s_ptrs, word, block, k0, K, EVEN_K: gl.constexpr):
    """Words [R, 4, J] and scale bytes (int32, one per word) of the k tile at k0 (scale stride along k: 1)."""
    if EVEN_K:
        w = gl.load(w_ptrs + k0 // 8)
        s = gl.load(s_ptrs + k0 // 16)
    else:
        w = gl.load(w_ptrs + k0 // 8, mask=word * 8 + k0 < K, other=0)
        s = gl.load(s_ptrs + k0 // 16, mask=block * 16 + k0 < K, other=0)
    s = s.to(gl.int32)
    s = gl.reshape(gl.join(s, s), [w.shape[0], 4, w.shape[2]])  # the scale of each word
    return w, gl.convert_layout(s, w.type.layout)


@gluon.jit
def _b_ptrs(x_base, row_off, BLOCK_K: gl.constexpr):
    """Pointers [4, J, 8, NC] of the rows at offsets row_off [NC] at k 0 (value t 8 J + 8 j + m), and k."""
    J: gl.constexpr = BLOCK_K // 32
    L4: gl.constexpr = _acts_layout(J, row_off.shape[0], gl.num_warps())
    t = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    j = gl.arange(0, J, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, L4))))
    m = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
    t4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(t, 1), 2), 3)
    j4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(j, 0), 2), 3)
    m4 = gl.expand_dims(gl.expand_dims(gl.expand_dims(m, 0), 1), 3)
    off = gl.convert_layout(row_off, gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    k = t4 * (8 * J) + j4 * 8 + m4
    return x_base + gl.expand_dims(gl.expand_dims(gl.expand_dims(off, 0), 1), 2) + k, k


@gluon.jit
def _next_k(k0, K, BLOCK_K: gl.constexpr, EVEN_K: gl.constexpr):
    """k of the next step's loads; EVEN_K: the last step reloads tile 0 rather than read past the rows (a
    select keeps k a known multiple of BLOCK_K, so loads stay vectorized)."""
    if EVEN_K:
        return gl.where(k0 + BLOCK_K < K, k0 + BLOCK_K, 0)
    return k0 + BLOCK_K


@gluon.jit
def _swap_last(y):
    a, b = gl.split(y)
    return gl.join(b, a)


@gluon.jit
def _load_b(b_ptrs, k, k0, K, EVEN_K: gl.constexpr):
    """B operand [32 J, NC] bf16 of the k tile at k0 in decoded-weight order: position 32 j + 8 t + i holds
    value t 8 J + 8 j + 4 (i % 2) + 3 - i // 2 (one 16-byte load per eight values, then register moves)."""
    if EVEN_K:
        x = gl.load(b_ptrs + k0).to(gl.bfloat16)
    else:
        x = gl.load(b_ptrs + k0, mask=k + k0 < K, other=0.0).to(gl.bfloat16)
    J: gl.constexpr = x.shape[1]
    NC: gl.constexpr = x.shape[3]
    # value m = 4 m2 + 2 m1 + m0 of a group of eight sits at i = 4 i2 + 2 i1 + i0 with
    # m2 = i0, m1 = 1 - i2, m0 = 1 - i1
    y = gl.permute(gl.reshape(x, [4, J, 2, 2, 2, NC]), (0, 1, 5, 2, 3, 4))  # [t, j, n, m2, m1, m0]
    y = _swap_last(y)  # m0 -> i1
    y = _swap_last(gl.permute(y, (0, 1, 2, 3, 5, 4)))  # [t, j, n, m2, i1, i2]
    y = gl.reshape(gl.permute(y, (1, 0, 5, 4, 3, 2)), [32 * J, NC])  # [j, t, i2, i1, i0 = m2, n]
    return gl.convert_layout(y, _operand(1, gl.num_warps()))


@gluon.jit
def _columns(expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E, N,
             PAIR_MODE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, L: gl.constexpr):
    """(expert, n0, slots, pairs, used) of this program, slots / pairs / used [NC] in L. Every column's slot
    lies inside act, so loads need no column mask (unused columns are never stored). Programs walk m blocks
    fastest, so one expert's blocks share its weight tile in L2."""
    num_m = gl.num_programs(0) // gl.cdiv(N, BLOCK_N)
    pid = gl.program_id(0)
    pid_m = pid % num_m
    col = gl.arange(0, _num_cols(BLOCK_M), layout=L)
    if PAIR_MODE:
        e = gl.load(expert_ids_ptr + pid_m)
        used = (col == 0) & (e >= 0) & (e < E)
        slots = pid_m + col * 0  # unused columns read the used one's row (valid memory, never stored)
        pairs = slots
    else:
        e = gl.load(block_expert_ptr + pid_m)
        end = gl.load(expert_end_ptr + gl.maximum(e, 0))
        slots = pid_m * BLOCK_M + col % BLOCK_M  # columns past BLOCK_M repeat the block's slots
        used = (col < BLOCK_M) & (slots < end) & (e >= 0) & (e < E)
        pairs = gl.load(sorted_pair_ptr + slots, mask=used, other=0)
    return e, (pid // num_m) * BLOCK_N, slots, pairs, used


@gluon.jit
def nvfp4_mma_gate_up_kernel(
    x_ptr, stride_xm,  # hidden [T, K] bf16
    row_ids_ptr, expert_ids_ptr,  # [M] int32: each pair's hidden row and local expert (-1: padding)
    sorted_pair_ptr, block_expert_ptr, expert_end_ptr,  # the sort (not read in pair mode)
    w_ptr, stride_we, stride_wn,  # w13 [E, 2I, K / 8] int32 words
    s_ptr, stride_se, stride_sn, stride_sk,  # block scales [E, 2I, K / 16] e4m3 as uint8; stride_sk must be 1
    g_ptr, stride_ge,  # global scale fp32
    b_ptr, stride_be,  # b13 [E, 2I] fp32 (HAS_BIAS)
    act_ptr, stride_am,  # act [slots, I]: slot order (pair order in pair mode)
    E, I, K, limit, alpha,
    ACT: gl.constexpr, HAS_BIAS: gl.constexpr, PAIR_MODE: gl.constexpr, USE_PDL: gl.constexpr, EVEN_K: gl.constexpr,
    PREFETCH: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
):
    if USE_PDL:
        _pdl_launch_dependents()
    C: gl.constexpr = _mma_layout(gl.num_warps())
    e, n0, slots, pairs, used = _columns(expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E, I,
                                         PAIR_MODE, BLOCK_M, BLOCK_N, gl.SliceLayout(0, C))
    if (e >= 0) & (e < E):
        e64 = e.to(gl.int64)
        wg, sg, word, block = _a_ptrs(w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, n0, I, stride_wn,
                                      stride_sn, BLOCK_N, BLOCK_K)
        wu = wg + I.to(gl.int64) * stride_wn
        su = sg + I.to(gl.int64) * stride_sn
        rows = gl.load(row_ids_ptr + pairs, mask=used, other=0).to(gl.int64)
        xb, k = _b_ptrs(x_ptr, rows * stride_xm, BLOCK_K)
        acc_g = gl.zeros([BLOCK_N, _num_cols(BLOCK_M)], gl.float32, layout=C)
        acc_u = gl.zeros_like(acc_g)
        w, s = _load_a(wg, sg, word, block, 0, K, EVEN_K)
        w2, s2 = _load_a(wu, su, word, block, 0, K, EVEN_K)
        xk = _load_b(xb, k, 0, K, EVEN_K)
        for k0 in range(0, K, BLOCK_K):
            kn = _next_k(k0, K, BLOCK_K, EVEN_K)
            if PREFETCH:  # the next step's loads go out before this step's decode
                w_n, s_n = _load_a(wg, sg, word, block, kn, K, EVEN_K)
                w2_n, s2_n = _load_a(wu, su, word, block, kn, K, EVEN_K)
                xk_n = _load_b(xb, k, kn, K, EVEN_K)
            acc_g = mma_v2(_decode(w, s), xk, acc_g)
            acc_u = mma_v2(_decode(w2, s2), xk, acc_u)
            if not PREFETCH:
                w_n, s_n = _load_a(wg, sg, word, block, kn, K, EVEN_K)
                w2_n, s2_n = _load_a(wu, su, word, block, kn, K, EVEN_K)
                xk_n = _load_b(xb, k, kn, K, EVEN_K)
            w, s, w2, s2, xk = w_n, s_n, w2_n, s2_n, xk_n
        glob = gl.load(g_ptr + e64 * stride_ge) * SCALE_BIAS
        rs = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, C)), 1)  # [BN, 1]
        r_in = rs < I
        gate = acc_g * glob
        up = acc_u * glob
        if HAS_BIAS:
            gate += gl.load(b_ptr + e64 * stride_be + rs, mask=r_in, other=0.0)
            up += gl.load(b_ptr + e64 * stride_be + I + rs, mask=r_in, other=0.0)
        h = _activation(gate, up, ACT, limit, alpha)
        dst = act_ptr + gl.expand_dims(slots.to(gl.int64) * stride_am, 0) + rs
        gl.store(dst, h.to(act_ptr.dtype.element_ty), mask=r_in & gl.expand_dims(used, 0))


@gluon.jit
def nvfp4_mma_down_kernel(
    act_ptr, stride_am,  # act [slots, K] bf16
    expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr,
    w_ptr, stride_we, stride_wn,  # w2 [E, N, K / 8] int32 words
    s_ptr, stride_se, stride_sn, stride_sk,  # block scales [E, N, K / 16] e4m3 as uint8; stride_sk must be 1
    g_ptr, stride_ge,
    b_ptr, stride_be,  # b2 [E, N] fp32 (HAS_BIAS)
    out_ptr, stride_om,  # out [M, N] in pair order
    E, N, K,
    HAS_BIAS: gl.constexpr, PAIR_MODE: gl.constexpr, USE_PDL: gl.constexpr, EVEN_K: gl.constexpr,
    PREFETCH: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
):
    C: gl.constexpr = _mma_layout(gl.num_warps())
    e, n0, slots, pairs, used = _columns(expert_ids_ptr, sorted_pair_ptr, block_expert_ptr, expert_end_ptr, E, N,
                                         PAIR_MODE, BLOCK_M, BLOCK_N, gl.SliceLayout(0, C))
    if (e >= 0) & (e < E):
        e64 = e.to(gl.int64)
        wp, sp, word, block = _a_ptrs(w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, n0, N, stride_wn,
                                      stride_sn, BLOCK_N, BLOCK_K)
        xb, k = _b_ptrs(act_ptr, slots.to(gl.int64) * stride_am, BLOCK_K)
        w, s = _load_a(wp, sp, word, block, 0, K, EVEN_K)  # weights do not depend on gate_up
        if USE_PDL:
            _pdl_wait()
        xk = _load_b(xb, k, 0, K, EVEN_K)
        acc = gl.zeros([BLOCK_N, _num_cols(BLOCK_M)], gl.float32, layout=C)
        for k0 in range(0, K, BLOCK_K):
            kn = _next_k(k0, K, BLOCK_K, EVEN_K)
            if PREFETCH:
                w_n, s_n = _load_a(wp, sp, word, block, kn, K, EVEN_K)
                xk_n = _load_b(xb, k, kn, K, EVEN_K)
            acc = mma_v2(_decode(w, s), xk, acc)
            if not PREFETCH:
                w_n, s_n = _load_a(wp, sp, word, block, kn, K, EVEN_K)
                xk_n = _load_b(xb, k, kn, K, EVEN_K)
            w, s, xk = w_n, s_n, xk_n
        acc = acc * (gl.load(g_ptr + e64 * stride_ge) * SCALE_BIAS)
        rs = gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, C)), 1)
        r_in = rs < N
        if HAS_BIAS:
            acc += gl.load(b_ptr + e64 * stride_be + rs, mask=r_in, other=0.0)
        dst = out_ptr + gl.expand_dims(pairs.to(gl.int64) * stride_om, 0) + rs
        gl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=r_in & gl.expand_dims(used, 0))
