"""Activation quantization kernels (fp8 per-token-group, nvfp4 per 16 values).

Bit for bit the plain-torch twins of epmoe/quant.py (the same fp32 operations in the same order):
IEEE division (`div_rn`; `/` is approximate on NVIDIA GPUs), and e4m3 round-to-nearest-even done
on the bits, since the interpreter's `.to(tl.float8e4nv)` flushes subnormals (0.0013 -> 0, not 2^-9).
"""

import triton
import triton.language as tl


@triton.jit
def e4m3_bits(y):
    """fp32 y with |y| <= 448 -> float8_e4m3fn bit pattern (uint8), round to nearest even."""
    sign = (y.to(tl.uint32, bitcast=True) >> 31) << 7
    a = tl.abs(y)
    ab = a.to(tl.uint32, bitcast=True)
    # normal range: keep 3 mantissa bits with RNE, rebias the exponent from 127 to 7
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal range (< 2^-6): multiples of 2^-9; adding 2^23 rounds to an integer with RNE
    sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    return (sign | tl.where(a < 0.015625, sub, normal)).to(tl.uint8)


@triton.jit
def e4m3_groups(x, EPS):
    """fp32 rows x [R, G] of one group each -> (e4m3 bits uint8 [R, G], fp32 scales [R]):
    s = max(amax, EPS) / 448, q = e4m3(clamp(x / s, +-448)) (quantize_fp8_groups_torch's order)."""
    s = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), EPS), 448.0)
    y = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None]), -448.0), 448.0)
    return e4m3_bits(y), s


@triton.jit
def e4m3_value(bits):
    """Non-negative float8_e4m3fn bit pattern (uint8) -> its fp32 value."""
    b = bits.to(tl.uint32) & 0x7F
    e = b >> 3
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    return tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)


@triton.jit
def e2m1_code(y):
    """fp32 y (divided by its scale) -> e2m1 code (uint8, bit 3 = sign), nearest, ties to even, saturating."""
    a = tl.abs(y)
    mag = ((a > 0.25).to(tl.uint8) + (a >= 0.75).to(tl.uint8) + (a > 1.25).to(tl.uint8)
           + (a >= 1.75).to(tl.uint8) + (a > 2.5).to(tl.uint8) + (a >= 3.5).to(tl.uint8)
           + (a > 5.0).to(tl.uint8))
    return mag | ((y < 0).to(tl.uint8) << 3)


@triton.jit
def fp8_group_quant_kernel(x_ptr, stride_x, q_ptr, H, s_ptr, n_groups, EPS,
                           GROUP: tl.constexpr, BLOCK: tl.constexpr, GROUPS: tl.constexpr):
    """One program per (row, GROUPS groups of GROUP values), per group:
        s = max(amax, EPS) / 448;  q = e4m3(clamp(x / s, +-448));  scales[row, group] = s
    x [T, H] (row stride stride_x), q [T, H] uint8 view of e4m3, s [T, n_groups] fp32;
    the last group may be partial (H % GROUP != 0)."""
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)  # [GROUPS]
    offs = tl.arange(0, BLOCK)
    col = grp[:, None] * GROUP + offs[None, :]  # [GROUPS, BLOCK]
    mask = (grp < n_groups)[:, None] & (offs < GROUP)[None, :] & (col < H)  # the last group may be partial
    x = tl.load(x_ptr + row * stride_x + col, mask=mask, other=0.0).to(tl.float32)
    bits, s = e4m3_groups(x, EPS)  # [GROUPS, BLOCK], [GROUPS]
    tl.store(q_ptr + row * H + col, bits, mask=mask)
    tl.store(s_ptr + row * n_groups + grp, s, mask=grp < n_groups)


@triton.jit
def nvfp4_quant_kernel(x_ptr, stride_x, q_ptr, half_h, s_ptr, n_blocks, g_ptr, BLOCKS: tl.constexpr):
    """One program per (row, BLOCKS blocks of 16 values), global scale g = *g_ptr:
        bs = e4m3(min(amax16 / (g * 6), 448));  sg = bs * g
        code = e2m1(x / sg) (0 where sg == 0);  byte j = code[2j] | code[2j + 1] << 4
    x [T, H], q [T, H/2] uint8, s [T, H/16] uint8 view of e4m3."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS] block index in the row
    bmask = b < n_blocks
    j = tl.arange(0, 8)  # byte within the block
    mask = bmask[:, None]
    even = x_ptr + row * stride_x + b[:, None] * 16 + 2 * j[None, :]  # [BLOCKS, 8]
    xe = tl.load(even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(even + 1, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))  # [BLOCKS]
    g = tl.load(g_ptr)
    bs_bits = e4m3_bits(tl.minimum(tl.math.div_rn(amax, g * 6.0), 448.0))
    sg = (e4m3_value(bs_bits) * g)[:, None]  # [BLOCKS, 1]
    ye = tl.where(sg > 0, tl.math.div_rn(xe, sg), 0.0)
    yo = tl.where(sg > 0, tl.math.div_rn(xo, sg), 0.0)
    packed = e2m1_code(ye) | (e2m1_code(yo) << 4)
    tl.store(q_ptr + row * half_h + b[:, None] * 8 + j[None, :], packed, mask=mask)
    tl.store(s_ptr + row * n_blocks + b, bs_bits, mask=bmask)
