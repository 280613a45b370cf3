"""Quantized formats: torch reference vs independent plain-torch quantizers, the Triton activation
kernels vs the torch reference (bit for bit), nvfp4 packing against a hand-computed example,
QuantizedTensor's tensor-like surface, and the reference runner on quantized weights."""

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from epmoe import ExpertWeights, MoEConfig
from epmoe.comm.base import Dispatched
from epmoe.experts.reference import reference_experts
from epmoe.ops.combine import count_experts
from epmoe.ops.quant import quantize_fp8_groups_triton, quantize_nvfp4_triton
from epmoe.quant import (
    E2M1_VALUES,
    FP8_DTYPE,
    QuantizedTensor,
    quantize_activations,
    quantize_fp8,
    quantize_fp8_block_torch,
    quantize_fp8_groups_torch,
    quantize_nvfp4_torch,
    quantize_weights,
    round_e2m1,
)

# The interpreter evaluates both sides of tl.where, so 0/0 in untaken branches warns.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")

# ---- independent quantizers: plain casts and loops, written from the format definitions -------


def fp8_block_by_loops(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (e4m3 [N, K], scale_inv [ceil(N/128), ceil(K/128)]), one block at a time."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(N / 128), math.ceil(K / 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s[i, j] = blk.abs().max() / 448.0
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def nvfp4_by_loops(w: torch.Tensor, g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (packed uint8 [N, K/2], e4m3 scales [N, K/16]): nearest grid point by search,
    ties to the even code, packing byte by byte."""
    grid = torch.tensor(E2M1_VALUES)
    N, K = w.shape
    packed = torch.empty(N, K // 2, dtype=torch.uint8)
    scales = torch.empty(N, K // 16, dtype=torch.float8_e4m3fn)
    g32 = torch.tensor(g, dtype=torch.float32)
    for r in range(N):
        codes = []
        for b in range(K // 16):
            blk = w[r, b * 16:(b + 1) * 16].float()
            scales[r, b] = (blk.abs().max() / (g32 * 6.0)).clamp(max=448.0).to(torch.float8_e4m3fn)
            sg = scales[r, b].float() * g32
            for v in blk:
                y = v / sg if sg > 0 else torch.tensor(0.0)
                d = (y.abs() - grid).abs()
                best = [i for i in range(8) if d[i] == d.min()]
                code = best[0] if len(best) == 1 else next(i for i in best if i % 2 == 0)
                codes.append(code | (8 if y < 0 else 0))
        for j in range(K // 2):
            packed[r, j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    return packed, scales


def test_fp8_block_matches_plain_casts():
    w = torch.randn(2, 200, 300)  # partial blocks on both dims
    q = quantize_fp8_block_torch(w)
    assert q.scales.shape == (2, 2, 3) and q.block == (1, 128, 128)
    for e in range(2):
        ref_q, ref_s = fp8_block_by_loops(w[e])
        assert torch.equal(q.data[e].view(torch.uint8), ref_q.view(torch.uint8))
        assert torch.equal(q.scales[e], ref_s)


def test_fp8_per_tensor_matches_plain_cast():
    w = torch.randn(3, 64, 96)
    q = quantize_fp8(w)
    for e in range(3):
        s = w[e].abs().max() / 448.0
        assert torch.equal(q.scales[e].flatten(), s.reshape(1))
        assert torch.equal(q.data[e].view(torch.uint8), (w[e] / s).to(torch.float8_e4m3fn).view(torch.uint8))


def test_nvfp4_matches_grid_search():
    w = torch.randn(6, 64) * torch.logspace(-3, 1, 64)
    q = quantize_nvfp4_torch(w)
    g = float(w.abs().max() / (6 * 448))
    assert torch.equal(q.global_scale, torch.tensor([[g]], dtype=torch.float32))
    ref_packed, ref_scales = nvfp4_by_loops(w, g)
    assert torch.equal(q.data, ref_packed)
    assert torch.equal(q.scales.view(torch.uint8), ref_scales.view(torch.uint8))


# Hand-computed: with global 1 and block amax 6 the block scale is 6 / 6 = 1.0 (e4m3 0x38), so
# codes are the values' own e2m1 codes. Ties: 0.25 -> 0 (code 0), 0.75 -> 1.0 (code 2),
# 1.25 -> 1.0 (2), 5 -> 4.0 (6); -0.1 -> -0 (8); sign is bit 3; first value in the low nibble.
HAND_VALUES = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -6, 0.25, 0.75, 1.25, 5, -0.1, 1.75]
HAND_BYTES = [0x10, 0x32, 0x54, 0x76, 0xF9, 0x20, 0x62, 0x48]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(("global_scale", "scale_byte"), [(1.0, 0x38), (0.5, 0x40)])
def test_nvfp4_hand_example(impl, global_scale, scale_byte):
    # global 0.5: block scale = 6 / (0.5 * 6) = 2.0 (0x40), and 2.0 * 0.5 = 1 again: the stored
    # global multiplies (ModelOpt weight_scale_2 / input_scale convention).
    x = torch.tensor([HAND_VALUES])
    g = torch.tensor(global_scale)
    q = quantize_nvfp4_torch(x, g) if impl == "torch" else quantize_nvfp4_triton(x, g)
    assert q.data.tolist() == [HAND_BYTES]
    assert q.scales.view(torch.uint8).tolist() == [[scale_byte]]
    expected = torch.tensor([[0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -6, 0, 1, 1, 4, -0.0, 2]])
    assert torch.equal(q.dequantize(), expected)


# Round trip dequantize(quantize(x)) on N(0, 1) data, relative Frobenius error. Measured
# (seed 0, [4, 256, 512]): fp8 0.027, fp8_block 0.026, nvfp4 0.095. e4m3 keeps 3 mantissa bits
# (element error <= 2^-4 relative); e2m1 one bit, with block scales in e4m3. Bounds ~1.3x measured.
ROUND_TRIP = {"fp8": 0.035, "fp8_block": 0.035, "nvfp4": 0.125}


@pytest.mark.parametrize("fmt", ["fp8", "fp8_block", "nvfp4"])
def test_round_trip_error(fmt):
    w = torch.randn(4, 256, 512, generator=torch.Generator().manual_seed(0))
    q = quantize_weights(w, fmt)
    err = float((q.dequantize() - w).norm() / w.norm())
    assert err < ROUND_TRIP[fmt]
    assert err > ROUND_TRIP[fmt] / 4  # a quantizer that does nothing would pass the upper bound alone


def test_grid_values_round_trip_exactly():
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    x = lut[codes.long()] * 0.25  # block scale 2^-2 with global 1: every value is representable
    x[:, ::16] = 6 * 0.25  # each block's amax is 6 * scale, so the block scale is exactly 0.25
    q = quantize_nvfp4_torch(x, torch.tensor(1.0))
    assert torch.equal(q.dequantize(), x)
    f = quantize_fp8(x, torch.tensor(2.0**-6))  # a power-of-two scale keeps e2m1 values exact in e4m3
    assert torch.equal(f.dequantize(), x)


# ---- Triton activation kernels: bit for bit against the torch reference -------------------------


@dataclass(frozen=True)
class KCase:
    name: str
    tokens: int
    hidden: int
    kind: str = "normal"  # "normal" | "wide_range" | "zeros" | "ties"


KCASES = [
    KCase("zero_tokens", 0, 256),
    KCase("one_token", 1, 128),
    KCase("odd_hidden_2880", 5, 2880),  # 22.5 fp8 groups: a partial last group
    KCase("wide_range_subnormals", 9, 256, "wide_range"),
    KCase("zero_rows", 4, 192, "zeros"),
    KCase("ties", 3, 64, "ties"),
]


def _kernel_input(c: KCase, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(c.tokens * 7 + c.hidden)
    x = torch.randn(c.tokens, c.hidden, generator=g)
    if c.kind == "wide_range":  # values that land in e4m3 subnormals and in the clamp
        x = x * torch.logspace(-7, 3, c.hidden)
        x[:, :3] = torch.tensor([-0.0, 1e-30, -6e4])
    elif c.kind == "zeros":
        x[1] = 0.0
        x[2, :16] = 0.0
    elif c.kind == "ties":  # exact midpoints of the e2m1 grid after scaling
        x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * (c.hidden // 8)).repeat(c.tokens, 1)
        x[1] = -x[1]
    x = x.to(dtype)
    # Poison: the rows live in a wider buffer whose extra columns hold inf, so a kernel reading
    # past H would change the scales.
    buf = torch.full((c.tokens, c.hidden + 16), float("inf"), dtype=dtype)
    buf[:, : c.hidden] = x
    return buf[:, : c.hidden]


def _assert_same(a: QuantizedTensor, b: QuantizedTensor) -> None:
    assert a.shape == b.shape and a.format == b.format and a.block == b.block
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    if a.scales.dtype == torch.float32:  # positive: equal values are equal bits
        assert torch.equal(a.scales, b.scales)
    else:
        assert torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
    if a.global_scale is not None:
        assert torch.equal(a.global_scale.reshape(-1), b.global_scale.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KCASES, ids=lambda c: c.name)
def test_triton_fp8_groups_bit_exact(case, dtype):
    x = _kernel_input(case, dtype)
    _assert_same(quantize_fp8_groups_triton(x), quantize_fp8_groups_torch(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KCASES, ids=lambda c: c.name)
@pytest.mark.parametrize("static", [False, True])
def test_triton_nvfp4_bit_exact(case, dtype, static):
    x = _kernel_input(case, dtype)
    g = torch.tensor(0.013) if static else None
    _assert_same(quantize_nvfp4_triton(x, g), quantize_activations(x, "nvfp4", g, backend="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", KCASES, ids=lambda c: c.name)
def test_triton_quant_bf16_gpu(case):
    x = _kernel_input(case, torch.bfloat16).cuda()
    _assert_same(quantize_fp8_groups_triton(x), quantize_fp8_groups_torch(x))
    _assert_same(quantize_nvfp4_triton(x), quantize_nvfp4_torch(x))


def test_triton_wrapper_errors():
    with pytest.raises(ValueError, match="multiple of the quantization group 16"):
        quantize_nvfp4_triton(torch.randn(2, 24))
    with pytest.raises(ValueError, match="unit stride"):
        quantize_fp8_groups_triton(torch.randn(64, 4).T)
    with pytest.raises(ValueError, match="one global scale"):
        quantize_nvfp4_triton(torch.randn(2, 32), torch.ones(2))


# ---- QuantizedTensor surface ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "fp8_block", "nvfp4"])
def test_weight_indexing_and_nbytes(fmt):
    w = torch.randn(5, 160, 96)
    q = quantize_weights(w, fmt)
    full = q.dequantize()
    assert q.shape == (5, 160, 96) and q.ndim == 3
    for e in (0, 3):
        assert q[e].shape == (160, 96)
        assert torch.equal(q[e].dequantize(), full[e])
    idx = torch.tensor([4, 1, 1])
    assert torch.equal(q[idx].dequantize(), full[idx])
    assert torch.equal(q[1:3].dequantize(), full[1:3])
    expected = {
        "fp8": 5 * 160 * 96 + 5 * 4,  # e4m3 values + one fp32 per expert
        "fp8_block": 5 * 160 * 96 + 5 * 2 * 1 * 4,  # blocks: ceil(160/128)=2 x ceil(96/128)=1
        "nvfp4": 5 * 160 * 96 // 2 + 5 * 160 * 96 // 16 + 5 * 4,  # nibbles + e4m3 per 16 + fp32 global
    }[fmt]
    assert q.nbytes == expected
    assert q.to("cpu").nbytes == expected


@pytest.mark.parametrize("fmt", ["fp8", "fp8_block", "nvfp4"])
def test_activation_rows_and_cat(fmt):
    x = torch.randn(7, 64)
    g = torch.tensor(0.01)  # static scale: rows quantized on different ranks can be concatenated
    q = quantize_activations(x, fmt, g if fmt != "fp8_block" else None)
    rows = torch.tensor([6, 0, 0, 3])
    assert torch.equal(q[rows].dequantize(), q.dequantize()[rows])
    parts = [quantize_activations(x[:3], fmt, g if fmt != "fp8_block" else None),
             quantize_activations(x[3:], fmt, g if fmt != "fp8_block" else None)]
    assert torch.equal(QuantizedTensor.cat(parts).dequantize(), q.dequantize())


def test_cat_refuses_different_per_tensor_scales():
    a, b = quantize_fp8(torch.randn(2, 32)), quantize_fp8(10 * torch.randn(2, 32))
    with pytest.raises(ValueError, match="different per-tensor scales"):
        QuantizedTensor.cat([a, b])


def test_bad_construction():
    with pytest.raises(ValueError, match="data must be"):
        QuantizedTensor(torch.zeros(2, 4), torch.ones(1, 1), (2, 4), "fp8")
    with pytest.raises(ValueError, match="scales dim 1 has 3 entries"):
        QuantizedTensor(torch.zeros(2, 256, dtype=FP8_DTYPE), torch.ones(2, 3), (1, 128), "fp8_block")
    with pytest.raises(ValueError, match="unknown quantized format"):
        QuantizedTensor(torch.zeros(2, 4, dtype=FP8_DTYPE), torch.ones(1, 1), (2, 4), "int4")
    with pytest.raises(ValueError, match="K % 16 == 0"):
        quantize_nvfp4_torch(torch.randn(2, 24))


# ---- the reference runner on quantized weights and payloads -------------------------------------


@pytest.mark.parametrize("fmt", ["fp8", "fp8_block", "nvfp4"])
def test_reference_runner_dequantizes(fmt):
    """reference_experts on QuantizedTensor weights and payload == on their dequantized tensors."""
    cfg = MoEConfig(hidden=64, intermediate=32, num_experts=4, top_k=2)
    g = torch.Generator().manual_seed(3)
    w = ExpertWeights.random(cfg, 4, generator=g)
    qw = ExpertWeights(quantize_weights(w.w13, fmt), quantize_weights(w.w2, fmt))
    qw.check(cfg, 4)
    assert qw.format == fmt
    dw = ExpertWeights(qw.w13.dequantize(), qw.w2.dequantize())
    x = quantize_activations(torch.randn(6, 64, generator=g), fmt)
    row_ids = torch.arange(6, dtype=torch.int32).repeat_interleave(2)
    expert_ids = torch.tensor([0, 1, 2, 3, -1, 1, 0, 0, 3, 2, 1, 1], dtype=torch.int32)
    d = Dispatched(x, row_ids, expert_ids, count_experts(expert_ids, 4))
    got = reference_experts(d.hidden, d.row_ids, d.expert_ids, qw, cfg)
    want = reference_experts(x.dequantize(), row_ids, expert_ids, dw, cfg)
    assert torch.equal(got, want)


def test_triton_e4m3_rounding_every_value_and_tie():
    """Every finite e4m3 value and every midpoint between neighbours (the ties), normal and
    subnormal, through the fp8 kernel with a group scale of exactly 1 (each group holds 448)."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x7F is NaN
    pos = codes.view(torch.float8_e4m3fn).float()  # 0 .. 448, increasing
    mids = (pos[:-1] + pos[1:]) / 2  # exact in fp32
    vals = torch.cat([pos, mids, -pos, -mids])
    pad = -vals.numel() % 127
    vals = torch.cat([vals, torch.zeros(pad)]).view(-1, 127)
    x = torch.cat([torch.full((vals.shape[0], 1), 448.0), vals], dim=1)  # [rows, 128], amax 448
    a, b = quantize_fp8_groups_triton(x), quantize_fp8_groups_torch(x)
    assert torch.equal(b.scales, torch.ones_like(b.scales))
    assert torch.equal(b.data.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
    _assert_same(a, b)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 8, allow_nan=False, width=32), min_size=1, max_size=64))
def test_e2m1_rounding_is_nearest_ties_to_even(values):
    a = torch.tensor(values, dtype=torch.float32)
    grid = torch.tensor(E2M1_VALUES)
    got = round_e2m1(a).long()
    d = (a.unsqueeze(-1) - grid).abs()  # [n, 8]
    best = d.min(-1, keepdim=True).values
    assert torch.all(d.gather(-1, got.unsqueeze(-1)) == best)  # a nearest grid point
    tie = (d == best).sum(-1) > 1
    assert torch.all(got[tie] % 2 == 0)  # ties go to the even code


@settings(max_examples=8, deadline=None)
@given(tokens=st.integers(0, 5), blocks=st.integers(1, 12), log_scale=st.floats(-20, 10), seed=st.integers(0, 99))
def test_triton_nvfp4_random_shapes(tokens, blocks, log_scale, seed):
    x = torch.randn(tokens, 16 * blocks, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    _assert_same(quantize_nvfp4_triton(x, blocks_per_program=4), quantize_nvfp4_torch(x))
    _assert_same(quantize_fp8_groups_triton(x, group=32), quantize_fp8_groups_torch(x, group=32))


def test_static_fp8_scale():
    x = torch.randn(4, 32)
    q = quantize_fp8(x, torch.tensor(0.01))
    assert torch.equal(q.scales, torch.full((1, 1), 0.01))
    assert torch.equal(q.data.view(torch.uint8), (x / 0.01).clamp(-448, 448).to(FP8_DTYPE).view(torch.uint8))
    with pytest.raises(ValueError, match="finite and > 0"):
        quantize_fp8(x, torch.tensor(0.0))
    with pytest.raises(ValueError, match="pass scale=None"):
        quantize_activations(x, "fp8_block", torch.tensor(1.0))
