"""nvfp4 expert GEMMs at decode (pair mode), written in Gluon: one program per (pair, n tile).

    gate_up:  act[m, n] = ACT(x . w_gate[e, n] + b, x . w_up[e, n] + b),  x = hidden[row_ids[m]]
    down:     out[m, n] = act[m] . w2[e, n] + b2[e, n]                    e = expert_ids[m]

w = e2m1(nibble) * scale_e4m3[e, n, k // 16] * global[e] (epmoe/quant.py; element 2i in the low
nibble): the PAIR_MODE products of grouped_gemm.py, with every operand loaded straight in the layout
its product uses (no shared memory, no barrier; `tl` needed four to six per k step) and weights read
as 32-bit words decoded by byte permutes (_E2M1_WORD_ASM; `gl.fp4_to_fp` on bytes ran 1.3-1.4x
slower). Layouts and measurements: docs/kernels.md.

        weight words  [R, G, 2]   the two 32-bit words (16 values) of one block per thread
        activation    8 x [G, 2]  value j of every word, fp32
        block scales  [R, G]

BLOCK_N rows by BLOCK_K values (G = BLOCK_K / 16) per tile, TG threads of a warp along the blocks.
PREFETCH: the next k step's weight loads go out before this step's compute. USE_PDL: as in
grouped_gemm.py (down loads its first weight tile, then waits). NVIDIA GPUs only (not the
interpreter); both paths sum in fp32, in a different order.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.jit
def _pdl_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _pdl_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.constexpr_function
def _tile_layout(values: int, tg: int, num_warps: int) -> gl.BlockedLayout:
    """[R, G, values] with `values` per thread along the last dim, tg threads of a warp along G."""
    return gl.BlockedLayout([1, 1, values], [32 // tg, tg, 1], [num_warps, 1, 1], [2, 1, 0])


@gluon.constexpr_function
def _sums_layout(tg: int, num_warps: int) -> gl.SliceLayout:
    """[R, G]: the per-block sums (the word tile reduced over its last dim)."""
    return gl.SliceLayout(2, _tile_layout(2, tg, num_warps))


@gluon.constexpr_function
def _rows_layout(tg: int, num_warps: int) -> gl.SliceLayout:
    """[R]: one output per weight row."""
    return gl.SliceLayout(1, _sums_layout(tg, num_warps))


# e2m1 -> fp32 for the eight values of one 32-bit word (value j in nibble j): byte-permute lookups give
# the two bytes of each bf16 pattern (0, 0.5, 1, 1.5, 2, 3, 4, 6), then the signs; 25 instructions, exact.
_E2M1_WORD_ASM = gl.constexpr("""{
.reg .b32 m, mh, s, sl, sh, t0, t1, c0, c1, p0, p1, p2, p3;
and.b32 m, $8, 0x77777777;
shr.u32 mh, m, 16;
and.b32 s, $8, 0x88888888;
shr.u32 sl, s, 3;
shr.u32 sh, s, 19;
prmt.b32 t0, 0x3F3F3F00, 0x40404040, m;
prmt.b32 t1, 0x3F3F3F00, 0x40404040, mh;
prmt.b32 sl, 0x00008000, 0, sl;
prmt.b32 sh, 0x00008000, 0, sh;
or.b32 t0, t0, sl;
or.b32 t1, t1, sh;
prmt.b32 c0, 0xC0800000, 0xC0804000, m;
prmt.b32 c1, 0xC0800000, 0xC0804000, mh;
prmt.b32 p0, c0, t0, 0x5140;
prmt.b32 p1, c0, t0, 0x7362;
prmt.b32 p2, c1, t1, 0x5140;
prmt.b32 p3, c1, t1, 0x7362;
shl.b32 $0, p0, 16;
and.b32 $1, p0, 0xFFFF0000;
shl.b32 $2, p1, 16;
and.b32 $3, p1, 0xFFFF0000;
shl.b32 $4, p2, 16;
and.b32 $5, p2, 0xFFFF0000;
shl.b32 $6, p3, 16;
and.b32 $7, p3, 0xFFFF0000;
}""")


@gluon.jit
def _decode8(w):
    """The eight fp32 values of every 32-bit word of w (value j from nibble j)."""
    return gl.inline_asm_elementwise(_E2M1_WORD_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(gl.float32,) * 8,
                                     is_pure=True, pack=1)


@gluon.jit
def _w_ptrs(w_base, s_base, n0, N, stride_wn, stride_sn, stride_sk,
            BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TG: gl.constexpr):
    """Pointers and masks of rows n0.. at k 0: words [R, G, 2] (stride_wn in words), scales [R, G]."""
    G: gl.constexpr = BLOCK_K // 16
    LW: gl.constexpr = _tile_layout(2, TG, gl.num_warps())
    LS: gl.constexpr = _sums_layout(TG, gl.num_warps())
    LW_RG: gl.constexpr = gl.SliceLayout(2, LW)
    r3 = gl.expand_dims(gl.expand_dims(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LW_RG)), 1), 2)
    g3 = gl.expand_dims(gl.expand_dims(gl.arange(0, G, layout=gl.SliceLayout(0, LW_RG)), 0), 2)
    j3 = gl.expand_dims(gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, LW))), 0), 1)
    w_ptrs = w_base + r3.to(gl.int64) * stride_wn + g3 * 2 + j3
    rs = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LS))
    gs = gl.arange(0, G, layout=gl.SliceLayout(0, LS))
    s_ptrs = s_base + gl.expand_dims(rs.to(gl.int64), 1) * stride_sn + gl.expand_dims(gs, 0) * stride_sk
    return w_ptrs, r3 < N, g3, s_ptrs, gl.expand_dims(rs < N, 1), gs


@gluon.jit
def _x_ptrs(x_row, BLOCK_K: gl.constexpr, TG: gl.constexpr):
    """Pointers [G, 2] of the activation at value 0 of each weight word (loads add 0..7), and block indices."""
    G: gl.constexpr = BLOCK_K // 16
    LX: gl.constexpr = gl.SliceLayout(0, _tile_layout(2, TG, gl.num_warps()))
    gx = gl.arange(0, G, layout=gl.SliceLayout(1, LX))
    j = gl.arange(0, 2, layout=gl.SliceLayout(0, LX))
    x_ptrs = x_row + gl.expand_dims(gx, 1) * 16 + gl.expand_dims(j, 0) * 8
    return x_ptrs, gl.expand_dims(gx, 1)


@gluon.jit
def _load_w(w_ptrs, w_rows_ok, g3, k0, K):
    return gl.load(w_ptrs + k0 // 8, mask=w_rows_ok & (g3 * 16 + k0 < K), other=0)


@gluon.jit
def _load_x(x_ptrs, gx, k0, K):
    """The activation's k tile in fp32: eight [1, G, 2] tensors, value j of every weight word."""
    x_ok = gx * 16 + k0 < K
    xp = x_ptrs + k0
    return (gl.expand_dims(gl.load(xp, mask=x_ok, other=0.0).to(gl.float32), 0),
            gl.expand_dims(gl.load(xp + 1, mask=x_ok, other=0.0).to(gl.float32), 0),
            gl.expand_dims(gl.load(xp + 2, mask=x_ok, other=0.0).to(gl.float32), 0),
            gl.expand_dims(gl.load(xp + 3, mask=x_ok, other=0.0).to(gl.float32), 0),
            gl.expand_dims(gl.load(xp + 4, mask=x_ok, other=0.0).to(gl.float32), 0),
            gl.expand_dims(gl.load(xp + 5, mask=x_ok, other=0.0).to(gl.float32), 0),
            gl.expand_dims(gl.load(xp + 6, mask=x_ok, other=0.0).to(gl.float32), 0),
            gl.expand_dims(gl.load(xp + 7, mask=x_ok, other=0.0).to(gl.float32), 0))


@gluon.jit
def _block_dots(w, s_ptrs, s_rows_ok, gs, x, k0, K, stride_sk):
    """fp32 [R, G]: per 16-value block, sum_j e2m1(w)[r, g, j] * x[g, j], times the block scale."""
    sc = gl.load(s_ptrs + (k0 // 16) * stride_sk, mask=s_rows_ok & gl.expand_dims(gs * 16 + k0 < K, 0), other=0.0)
    v0, v1, v2, v3, v4, v5, v6, v7 = _decode8(w)
    acc = v0 * x[0] + v1 * x[1] + v2 * x[2] + v3 * x[3] + v4 * x[4] + v5 * x[5] + v6 * x[6] + v7 * x[7]
    return gl.sum(acc, axis=2) * sc.to(gl.float32)


@gluon.jit
def _activation(g, u, ACT: gl.constexpr, limit, alpha):
    """fp32 gate/up -> fp32 activation (grouped_gemm._activation's formulas)."""
    if ACT == 0:
        return g / (1.0 + gl.exp(-g)) * u
    elif ACT == 1:
        return 0.5 * g * (1.0 + gl.erf(g * 0.7071067811865476)) * u
    else:
        g = gl.minimum(g, limit)
        u = gl.minimum(gl.maximum(u, -limit), limit)
        return (u + 1.0) * g / (1.0 + gl.exp(-alpha * g))


@gluon.jit
def _pair_tile(expert_ids_ptr, N, BLOCK_N: gl.constexpr):
    """This program's (pair m, first output column n0, expert e)."""
    pid = gl.program_id(0)
    num_n = gl.cdiv(N, BLOCK_N)
    m = pid // num_n
    return m, (pid % num_n) * BLOCK_N, gl.load(expert_ids_ptr + m)


@gluon.jit
def nvfp4_decode_gate_up_kernel(
    x_ptr, stride_xm,  # hidden [T, K] (bf16 / fp16 / fp32)
    row_ids_ptr, expert_ids_ptr,  # [M] int32: the pair's hidden row and local expert (-1: padding)
    w_ptr, stride_we, stride_wn,  # w13 [E, 2I, K / 2] uint8 (two e2m1 per byte)
    s_ptr, stride_se, stride_sn, stride_sk,  # block scales [E, 2I, K / 16] e4m3
    g_ptr, stride_ge,  # global scale fp32, one per expert (stride 0: per tensor)
    b_ptr, stride_be,  # b13 [E, 2I] fp32 (HAS_BIAS)
    act_ptr, stride_am,  # act [M, I]
    E, I, K, limit, alpha,
    ACT: gl.constexpr, HAS_BIAS: gl.constexpr, USE_PDL: gl.constexpr, PREFETCH: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TG: gl.constexpr,
):
    if USE_PDL:
        _pdl_launch_dependents()
    m, n0, e = _pair_tile(expert_ids_ptr, I, BLOCK_N)
    if (e >= 0) & (e < E):
        e64 = e.to(gl.int64)
        w_base = w_ptr + e64 * stride_we
        s_base = s_ptr + e64 * stride_se
        wg, wok, g3, sg, sok, gs = _w_ptrs(w_base, s_base, n0, I, stride_wn, stride_sn, stride_sk, BLOCK_N, BLOCK_K, TG)
        wu = wg + I.to(gl.int64) * stride_wn
        su = sg + I.to(gl.int64) * stride_sn
        x_ptrs, gx = _x_ptrs(x_ptr + gl.load(row_ids_ptr + m).to(gl.int64) * stride_xm, BLOCK_K, TG)
        bg = _load_w(wg, wok, g3, 0, K)
        bu = _load_w(wu, wok, g3, 0, K)
        part_g = gl.zeros([BLOCK_N, BLOCK_K // 16], gl.float32, layout=_sums_layout(TG, gl.num_warps()))
        part_u = gl.zeros_like(part_g)
        for k0 in range(0, K, BLOCK_K):
            if PREFETCH:
                bg_next = _load_w(wg, wok, g3, k0 + BLOCK_K, K)
                bu_next = _load_w(wu, wok, g3, k0 + BLOCK_K, K)
            x = _load_x(x_ptrs, gx, k0, K)
            part_g += _block_dots(bg, sg, sok, gs, x, k0, K, stride_sk)
            part_u += _block_dots(bu, su, sok, gs, x, k0, K, stride_sk)
            if not PREFETCH:
                bg_next = _load_w(wg, wok, g3, k0 + BLOCK_K, K)
                bu_next = _load_w(wu, wok, g3, k0 + BLOCK_K, K)
            bg = bg_next
            bu = bu_next
        glob = gl.load(g_ptr + e64 * stride_ge)
        gate = gl.sum(part_g, axis=1) * glob
        up = gl.sum(part_u, axis=1) * glob
        rs = n0 + gl.arange(0, BLOCK_N, layout=_rows_layout(TG, gl.num_warps()))
        r_ok = rs < I
        if HAS_BIAS:
            gate += gl.load(b_ptr + e64 * stride_be + rs, mask=r_ok, other=0.0)
            up += gl.load(b_ptr + e64 * stride_be + I + rs, mask=r_ok, other=0.0)
        h = _activation(gate, up, ACT, limit, alpha)
        gl.store(act_ptr + m.to(gl.int64) * stride_am + rs, h.to(act_ptr.dtype.element_ty), mask=r_ok)


@gluon.jit
def nvfp4_decode_down_kernel(
    act_ptr, stride_am,  # act [M, K] in pair order
    expert_ids_ptr,  # [M] int32 (-1: padding)
    w_ptr, stride_we, stride_wn,  # w2 [E, N, K / 2] uint8
    s_ptr, stride_se, stride_sn, stride_sk,  # block scales [E, N, K / 16] e4m3
    g_ptr, stride_ge,  # global scale fp32
    b_ptr, stride_be,  # b2 [E, N] fp32 (HAS_BIAS)
    out_ptr, stride_om,  # out [M, N] in pair order
    E, N, K,
    HAS_BIAS: gl.constexpr, USE_PDL: gl.constexpr, PREFETCH: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, TG: gl.constexpr,
):
    m, n0, e = _pair_tile(expert_ids_ptr, N, BLOCK_N)
    if (e >= 0) & (e < E):
        e64 = e.to(gl.int64)
        w, wok, g3, s, sok, gs = _w_ptrs(w_ptr + e64 * stride_we, s_ptr + e64 * stride_se, n0, N, stride_wn,
                                         stride_sn, stride_sk, BLOCK_N, BLOCK_K, TG)
        x_ptrs, gx = _x_ptrs(act_ptr + m.to(gl.int64) * stride_am, BLOCK_K, TG)
        b = _load_w(w, wok, g3, 0, K)  # weights do not depend on gate_up: loaded before the wait
        if USE_PDL:
            _pdl_wait()
        part = gl.zeros([BLOCK_N, BLOCK_K // 16], gl.float32, layout=_sums_layout(TG, gl.num_warps()))
        for k0 in range(0, K, BLOCK_K):
            if PREFETCH:
                b_next = _load_w(w, wok, g3, k0 + BLOCK_K, K)
            part += _block_dots(b, s, sok, gs, _load_x(x_ptrs, gx, k0, K), k0, K, stride_sk)
            if not PREFETCH:
                b_next = _load_w(w, wok, g3, k0 + BLOCK_K, K)
            b = b_next
        acc = gl.sum(part, axis=1) * gl.load(g_ptr + e64 * stride_ge)
        rs = n0 + gl.arange(0, BLOCK_N, layout=_rows_layout(TG, gl.num_warps()))
        r_ok = rs < N
        if HAS_BIAS:
            acc += gl.load(b_ptr + e64 * stride_be + rs, mask=r_ok, other=0.0)
        gl.store(out_ptr + m.to(gl.int64) * stride_om + rs, acc.to(out_ptr.dtype.element_ty), mask=r_ok)
