"""Quantized formats: fp8 e4m3 (per-tensor, 128x128 blocks / per-token groups of 128) and nvfp4.

Every scale *multiplies* the stored value on dequantization (docs/formats.md: conventions, sources):

    fp8        x ~ data.float() * scale                     scale fp32, one per tensor
    fp8_block  x ~ data.float() * scale[block]              weights: one per 128x128 block (DeepSeek-V3
                                                            `weight_scale_inv`); activations: per token per 128
    nvfp4      x ~ e2m1(nibble) * block_scale[16] * global  block_scale e4m3, global fp32 (ModelOpt
                                                            `weight_scale`, `weight_scale_2`, `input_scale`)

`QuantizedTensor` (weights [E, N, K] / [N, K], activation rows [T, H]) moves like a tensor (rows, `cat`,
`.to`, exact `nbytes`); runners call `.dequantize()`. The `*_torch` functions are the reference;
`quantize_*_triton` (epmoe/ops/quant.py) match them bit for bit; `quantize_activations` picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from epmoe.util import cdiv

FORMATS = ("fp8", "fp8_block", "nvfp4")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP4_MAX = 6.0  # largest e2m1 value
FP8_BLOCK = 128  # DeepSeek-V3 weight blocks are 128x128, activation groups 128 values
NVFP4_BLOCK = 16  # values per e4m3 block scale
AMAX_EPS = 1e-10  # smallest amax a scale uses: an all-zero group gets a finite scale (values quantize to 0), not 0/0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 code (low 3 bits) -> magnitude; bit 3 is the sign


@dataclass(eq=False)  # tensors inside: compare with dequantize() or the fields
class QuantizedTensor:
    """A quantized tensor with its scales.

    data:         fp8: float8_e4m3fn, the logical shape. nvfp4: uint8 [..., K/2], two e2m1
                  codes per byte, the first (even index) in the low nibble.
    scales:       fp32 (fp8, fp8_block) or float8_e4m3fn (nvfp4), one dim per logical dim
                  (size 1 broadcasts, else one scale per `block[d]` elements).
    block:        elements per scale along each logical dim.
    format:       "fp8", "fp8_block" or "nvfp4".
    global_scale: nvfp4 only: fp32, broadcastable to the logical shape (per tensor, per expert,
                  or per row when rows from different tensors are concatenated).
    """

    data: torch.Tensor
    scales: torch.Tensor
    block: tuple[int, ...]
    format: str
    global_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"unknown quantized format {self.format!r}; choose one of {FORMATS}")
        nvfp4 = self.format == "nvfp4"
        for what, t, want in (("data", self.data, torch.uint8 if nvfp4 else FP8_DTYPE),
                              ("scales", self.scales, FP8_DTYPE if nvfp4 else torch.float32)):
            if t.dtype != want:
                raise ValueError(f"{self.format} {what} must be {want}, got {t.dtype}")
        shape = self.shape
        if self.scales.dim() != len(shape) or len(self.block) != len(shape):
            raise ValueError(f"scales {tuple(self.scales.shape)} and block {self.block} must have one entry per "
                             f"dim of the logical shape {tuple(shape)}")
        for d, (n, s, b) in enumerate(zip(shape, self.scales.shape, self.block)):
            if s != 1 and s != cdiv(n, b):
                raise ValueError(f"scales dim {d} has {s} entries; {n} elements in blocks of {b} need "
                                 f"{cdiv(n, b)} (or 1 to broadcast)")
        g = self.global_scale
        if nvfp4 and (g is None or g.dtype != torch.float32):
            raise ValueError("nvfp4 needs an fp32 global_scale")
        if nvfp4 and (g.dim() != len(shape) or any(m not in (1, n) for m, n in zip(g.shape, shape))):
            raise ValueError(f"nvfp4 global_scale {tuple(g.shape)} must broadcast to {tuple(shape)} "
                             "with the same number of dims")
        if not nvfp4 and g is not None:
            raise ValueError(f"{self.format} has no global_scale")

    @property
    def shape(self) -> torch.Size:
        """The logical (unquantized) shape."""
        if self.format == "nvfp4":
            return torch.Size((*self.data.shape[:-1], self.data.shape[-1] * 2))
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.dim()

    def dim(self) -> int:
        return self.data.dim()

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of data + scales + global scale (what a transfer moves)."""
        parts = (self.data, self.scales) if self.global_scale is None else (self.data, self.scales, self.global_scale)
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """A copy on `device` (data, scales and global scale move together)."""
        g = None if self.global_scale is None else self.global_scale.to(device)
        return QuantizedTensor(self.data.to(device), self.scales.to(device), self.block, self.format, g)

    def __getitem__(self, index: Any) -> QuantizedTensor:
        """Select along the leading dim: an int (drops the dim, e.g. one expert of [E, N, K]),
        a slice, or an index tensor (rows of activations [T, H])."""
        if isinstance(index, tuple):
            raise TypeError("QuantizedTensor supports indexing of the leading dim only")
        if self.block[0] != 1 and self.scales.shape[0] != 1:
            raise ValueError(f"cannot index the leading dim of a {self.format} tensor whose scales cover "
                             f"{self.block[0]} rows each; dequantize first")

        def pick(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] == 1 and self.shape[0] != 1:  # broadcast dim
                return t[0] if isinstance(index, int) else t
            return t[index]

        g = None if self.global_scale is None else pick(self.global_scale)
        block = self.block[1:] if isinstance(index, int) else self.block
        return QuantizedTensor(self.data[index], pick(self.scales), block, self.format, g)

    @staticmethod
    def cat(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
        """Concatenate along the leading dim (e.g. rows received from several ranks). The parts
        must share format, block and trailing shape; broadcast (per-tensor) scales must be equal,
        otherwise the result would need per-row scales: quantize with a shared scale."""
        if not parts:
            raise ValueError("cat needs at least one QuantizedTensor")
        first = parts[0]

        def blocks(q: QuantizedTensor) -> tuple[int, ...]:  # block sizes that matter (not broadcast)
            return tuple(b if s != 1 else 0 for b, s in zip(q.block[1:], q.scales.shape[1:]))

        for p in parts[1:]:
            if p.format != first.format or blocks(p) != blocks(first) or p.shape[1:] != first.shape[1:]:
                raise ValueError(f"cannot cat {p.format} {tuple(p.shape)} block {p.block} with "
                                 f"{first.format} {tuple(first.shape)} block {first.block}")

        def join(ts: list[torch.Tensor], shapes: list[int]) -> torch.Tensor:
            if all(t.shape[0] == 1 for t in ts) and any(n != 1 for n in shapes):
                if not all(torch.equal(t, ts[0]) for t in ts):
                    raise ValueError("cannot cat quantized tensors with different per-tensor scales; quantize "
                                     "every part with the same scale (static input scale or an all-reduced amax)")
                return ts[0]
            return torch.cat([t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t for t, n in zip(ts, shapes)])

        shapes = [p.shape[0] for p in parts]
        scales = join([p.scales for p in parts], shapes)
        g = None if first.global_scale is None else join([p.global_scale for p in parts], shapes)
        return QuantizedTensor(torch.cat([p.data for p in parts]), scales, first.block, first.format, g)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The logical tensor in `dtype` (computed in fp32)."""
        values = unpack_e2m1(self.data) if self.format == "nvfp4" else self.data.float()  # [..., K] fp32
        out = values * expand_scales(self.scales.float(), self.block, self.shape)
        if self.global_scale is not None:
            out = out * self.global_scale
        return out.to(dtype)


def expand_scales(scales: torch.Tensor, block: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Scales broadcast to the logical `shape`: dims of size 1 broadcast, others repeat each
    scale `block[d]` times (cropped to shape[d])."""
    out = scales
    for d, (n, b) in enumerate(zip(shape, block)):
        if out.shape[d] != 1:
            out = out.repeat_interleave(b, dim=d).narrow(d, 0, n)
    return out


def div_rn(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c rounded to nearest on every device: CUDA divides by a Python scalar as a multiply by its
    reciprocal (1 ulp off at times); a 0-dim tensor divides truly everywhere (as the kernels' div_rn)."""
    return t / torch.full((), c, dtype=t.dtype, device=t.device)


def _check_float(x: torch.Tensor, what: str, dims: str = "", ok: bool = True) -> None:
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise ValueError(f"{what} expects a bf16/fp16/fp32 tensor, got {x.dtype}")
    if not ok:
        raise ValueError(f"{what} needs {dims}, got shape {tuple(x.shape)}")


def _static_scale(scale: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"{what} must be finite and > 0")
    return scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> QuantizedTensor:
    """fp8 e4m3 with one fp32 scale per trailing matrix (per expert for [E, N, K], one for [N, K]
    or activations [T, H]). `scale` (static, e.g. a checkpoint `input_scale`) must broadcast the
    same way; default: amax / 448. data = clamp(x / scale, +-448) rounded to nearest even."""
    _check_float(x, "quantize_fp8", "a matrix or a stack of matrices", x.dim() >= 2)
    xf, lead = x.float(), x.shape[:-2]
    if scale is None:
        amax = xf.abs().amax(dim=(-2, -1), keepdim=True) if xf.numel() else xf.new_zeros(*lead, 1, 1)
        scale = div_rn(amax.clamp_min(AMAX_EPS), FP8_MAX)  # [..., 1, 1]
    else:
        scale = scale.float().to(x.device)
        scale = scale.reshape([1] * x.dim()) if scale.numel() == 1 else scale.reshape(*lead, 1, 1)
        _static_scale(scale, "quantize_fp8: a static scale")
    data = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QuantizedTensor(data, scale.expand(*lead, 1, 1).contiguous(), (*[1] * len(lead), *x.shape[-2:]), "fp8")


def quantize_fp8_block_torch(x: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)) -> QuantizedTensor:
    """Weights [..., N, K] -> fp8 e4m3 with one fp32 scale per block[0] x block[1] tile of the last
    two dims (scales [..., ceil(N/128), ceil(K/128)], DeepSeek-V3 `weight_scale_inv`).
    scale = amax(tile) / 448; data = x / scale rounded to nearest even."""
    _check_float(x, "quantize_fp8_block_torch", "[..., N, K] (block quantization)", x.dim() >= 2)
    *lead, N, K = x.shape
    bn, bk = block
    pn, pk = cdiv(N, bn) * bn, cdiv(K, bk) * bk
    xf = torch.nn.functional.pad(x.float(), (0, pk - K, 0, pn - N))  # [..., pn, pk], zero padding
    tiles = xf.reshape(*lead, pn // bn, bn, pk // bk, bk)
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., N/bn, K/bk]
    scales = div_rn(amax.clamp_min(AMAX_EPS), FP8_MAX)
    q = (tiles / scales[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    data = q.reshape(*lead, pn, pk)[..., :N, :K].contiguous()
    return QuantizedTensor(data, scales.contiguous(), (*[1] * len(lead), bn, bk), "fp8_block")


def quantize_fp8_groups_torch(x: torch.Tensor, group: int = FP8_BLOCK) -> QuantizedTensor:
    """Activations [T, H] -> fp8 e4m3 with one fp32 scale per token per `group` values
    (scales [T, ceil(H/group)]): the block quantization with 1 x group tiles, s = max(amax, 1e-10) / 448."""
    _check_float(x, "quantize_fp8_groups_torch", "[T, H] (activation quantization)", x.dim() == 2)
    return quantize_fp8_block_torch(x, (1, group))


def round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """|x| (fp32, >= 0) -> e2m1 magnitude code 0..7, round to nearest, ties to even code,
    saturating at 6. Each threshold is a midpoint; `>=` where the upper neighbour is even."""
    return ((a > 0.25).to(torch.uint8) + (a >= 0.75).to(torch.uint8) + (a > 1.25).to(torch.uint8)
            + (a >= 1.75).to(torch.uint8) + (a > 2.5).to(torch.uint8) + (a >= 3.5).to(torch.uint8)
            + (a > 5.0).to(torch.uint8))


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] uint8 codes (0..15) -> [..., K/2] uint8, element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


_E2M1_LUT: dict[torch.device, torch.Tensor] = {}


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] fp32 values (inverse of pack_e2m1 + the e2m1 grid)."""
    lut = _E2M1_LUT.get(packed.device)  # [16], copied once per device: a copy inside a CUDA-graph
    if lut is None:  # capture is illegal, and a first eager call (a capture's warm-up) makes it
        lut = _E2M1_LUT[packed.device] = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES),
                                                       device=packed.device)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).long()  # [..., K]
    return lut[codes]


def nvfp4_global_scale(x: torch.Tensor, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    """ModelOpt's dynamic global scale: amax / (6 * 448), over `dims` (keepdim), fp32."""
    return div_rn(x.float().abs().amax(dim=tuple(dims), keepdim=True).clamp_min(AMAX_EPS), FP4_MAX * FP8_MAX)


def quantize_nvfp4_torch(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> QuantizedTensor:
    """x [..., K] (K % 16 == 0) -> nvfp4.

    global g: given (ModelOpt `weight_scale_2` / `input_scale`, broadcastable to x), else
    amax / (6 * 448) per trailing matrix. Per block of 16, in fp32:
        s  = e4m3(clamp(amax16 / (g * 6), <= 448))      (round to nearest even)
        sg = float(s) * g
        q  = e2m1(x / sg) if sg > 0 else 0               (round to nearest, ties to even)
    and dequant = e2m1 * s * g, so s * g ~ amax16 / 6 and the largest value maps near 6.
    """
    _check_float(x, "quantize_nvfp4_torch")
    if x.dim() < 2 or x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 needs [..., K] with K % 16 == 0 (K is the GEMM reduction dim), got {tuple(x.shape)}")
    xf = x.float()
    if global_scale is None:
        g = nvfp4_global_scale(xf) if xf.numel() else xf.new_ones(*x.shape[:-2], 1, 1)
    else:
        g = global_scale.float()
        g = _static_scale(g if g.dim() == x.dim() else g.reshape([1] * (x.dim() - g.dim()) + list(g.shape)),
                          "nvfp4 global scale")
    *lead, K = x.shape
    blocks = xf.reshape(*lead, K // NVFP4_BLOCK, NVFP4_BLOCK)  # [..., K/16, 16]
    gb = g.unsqueeze(-1)  # broadcast over the block dim
    bs = (blocks.abs().amax(dim=-1, keepdim=True) / (gb * FP4_MAX)).clamp_max(FP8_MAX).to(FP8_DTYPE)
    sg = bs.float() * gb  # [..., K/16, 1]
    y = torch.where(sg > 0, blocks / sg, torch.zeros((), device=x.device))
    codes = round_e2m1(y.abs()) | ((y < 0).to(torch.uint8) << 3)
    data = pack_e2m1(codes.reshape(*lead, K))
    g = g.expand([n if s != 1 else 1 for n, s in zip(x.shape, g.shape)]).contiguous()
    return QuantizedTensor(data, bs.squeeze(-1).contiguous(), (*[1] * len(lead), NVFP4_BLOCK), "nvfp4", g)


def quantize_activations(x: torch.Tensor, fmt: str, scale: torch.Tensor | None = None,
                         backend: str = "auto") -> QuantizedTensor:
    """Quantize activation rows [T, H] in `fmt` ("fp8", "fp8_block", "nvfp4"). scale: a static per-tensor
    scale (checkpoint `input_scale`; fp8_block: always dynamic) or None (from x's amax). backend: "torch",
    "triton" or "auto" (Triton on CUDA)."""
    from epmoe.ops.quant import quantize_fp8_groups_triton, quantize_nvfp4_triton

    if fmt == "fp8_block" and scale is not None:
        raise ValueError("fp8_block activations have dynamic per-token-group scales; pass scale=None")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch', 'triton' or 'auto', got {backend!r}")
    if fmt == "fp8":
        return quantize_fp8(x, scale)
    if fmt == "fp8_block":
        return quantize_fp8_groups_triton(x) if backend == "triton" else quantize_fp8_groups_torch(x)
    if fmt != "nvfp4":
        raise ValueError(f"unknown activation format {fmt!r}; choose one of {FORMATS}")
    if backend == "triton":
        return quantize_nvfp4_triton(x, scale)
    return quantize_nvfp4_torch(x, None if scale is None else scale.reshape(1, 1).to(x.device))


def quantize_weights(w: torch.Tensor, fmt: str) -> QuantizedTensor:
    """Quantize expert weights [E, N, K] (or one matrix [N, K]) in `fmt` with dynamic scales:
    fp8 one scale per matrix, fp8_block 128x128 blocks, nvfp4 16-value blocks + a global per matrix."""
    quantize = {"fp8": quantize_fp8, "fp8_block": quantize_fp8_block_torch, "nvfp4": quantize_nvfp4_torch}.get(fmt)
    if quantize is None:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {FORMATS}")
    return quantize(w)
