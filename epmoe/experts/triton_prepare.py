"""Load-time weight preparation of the triton runner (`TritonRunner.prepare`).

The loader's fused w13 can hold finer scales than the kernels' grid; `prepare_triton` merges them
(largest scale wins, smaller rows requantized; bounds in docs/formats.md, "The Triton runner's layout").
"""

from __future__ import annotations

import torch

from epmoe.config import MoEConfig
from epmoe.experts.base import ExpertWeights, weight_family
from epmoe.quant import FP8_BLOCK, FP8_DTYPE, FP8_MAX, NVFP4_BLOCK, QuantizedTensor, pack_e2m1, round_e2m1, unpack_e2m1
from epmoe.util import cdiv


def prepare_triton(weights: ExpertWeights, cfg: MoEConfig) -> ExpertWeights:
    """The layout the Triton kernels read (`_check_quantized` in experts/triton.py), from loaded weights:

        bf16       w13 [E, 2I, H], w2 [E, H, I] as is, contiguous
        fp8        one fp32 scale per expert: scales [E, 1, 1]
        fp8_block  one fp32 scale per 128x128 tile: scales [E, ceil(N/128), ceil(K/128)]
        nvfp4      e4m3 scales [E, N, K/16] and one fp32 global scale per expert [E, 1, 1]

    The loader's w13 may hold finer scales (w2 already fits): fp8 gate's and up's ([E, 2, 1]); fp8_block
    with I % 128 != 0 one row per weight row; nvfp4 a global per row when gate's and up's differ. Where
    the scales agree nothing changes.
    """
    if weight_family(weights.format) == "bf16":  # unquantized: bf16, fp16 or fp32
        return ExpertWeights(weights.w13.contiguous(), weights.w2.contiguous(), weights.b13, weights.b2)
    fix = _merge_nvfp4_globals if weights.format == "nvfp4" else _merge_fp8_scales
    return ExpertWeights(fix(weights.w13), fix(weights.w2), weights.b13, weights.b2)


def _scale_rows(w: QuantizedTensor) -> torch.Tensor:
    """The scale of every weight row per column block: [E, N, scales.shape[2]] fp32."""
    E, N = w.shape[0], w.shape[1]
    sc = w.scales.float()
    if sc.shape[1] == 1:
        return sc.expand(E, N, sc.shape[2])
    return sc.expand(E, *sc.shape[1:]).repeat_interleave(w.block[1], dim=1)[:, :N]


def _merge_fp8_scales(w: QuantizedTensor) -> QuantizedTensor:
    """fp8 -> one scale per expert; fp8_block -> one scale per 128x128 tile (the kernels' grid).

    Each tile takes the largest scale s_max of its rows; rows at s_max keep their bytes, the others
    become q' = e4m3(q * s / s_max) (nothing saturates): |x' - x| <= max(2^-4 |x|, 2^-10 s_max).
    """
    E, N, K = w.shape
    row_block, col_block = (N, K) if w.format == "fp8" else (FP8_BLOCK, FP8_BLOCK)
    if w.format == "fp8" and tuple(w.scales.shape[1:]) == (1, 1):
        return QuantizedTensor(w.data.contiguous(), w.scales.float().expand(E, 1, 1).contiguous(),
                               (1, N, K), "fp8")
    if w.format == "fp8_block" and (w.scales.shape[1] == 1 or w.block[1] == FP8_BLOCK) and (
            w.scales.shape[2] == 1 or w.block[2] == FP8_BLOCK):
        return QuantizedTensor(w.data.contiguous(), w.scales.contiguous(), w.block, "fp8_block")
    if w.format == "fp8_block" and w.scales.shape[2] != 1 and w.block[2] != FP8_BLOCK:
        raise ValueError(f"fp8_block weights with column blocks of {w.block[2]} cannot be merged onto the 128x128 "
                         "grid; requantize with epmoe.quant.quantize_fp8_block_torch")
    rows = _scale_rows(w)  # [E, N, Kb]
    if rows.shape[2] == 1:
        col_block = K
    nb = cdiv(N, row_block)
    padded = torch.nn.functional.pad(rows, (0, 0, 0, nb * row_block - N))  # zeros never win the max
    tiles = padded.view(E, nb, row_block, rows.shape[2]).amax(dim=2)  # [E, N/rb, Kb]
    target = tiles.repeat_interleave(row_block, dim=1)[:, :N]  # [E, N, Kb]
    keep = target == rows
    out = w.data.contiguous().clone()
    bits = out.view(torch.uint8)
    for e in range(E):
        moved = (~keep[e]).any(dim=1).nonzero().flatten()  # rows with at least one smaller scale
        if not moved.numel():
            continue
        ratio = (rows[e, moved].double() / target[e, moved].double()).repeat_interleave(col_block, dim=-1)[:, :K]
        q = (w.data[e, moved].double() * ratio).float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        same = keep[e, moved].repeat_interleave(col_block, dim=-1)[:, :K]
        bits[e, moved] = torch.where(same, bits[e, moved], q.view(torch.uint8))
    block = (1, N, K) if w.format == "fp8" else (1, FP8_BLOCK, FP8_BLOCK)
    return QuantizedTensor(out, tiles.contiguous(), block, w.format)


def _merge_nvfp4_globals(w: QuantizedTensor) -> QuantizedTensor:
    """nvfp4 with a global scale per row (fused gate/up whose `weight_scale_2` differ) -> one
    global per expert, G = the largest.

    A row with global g < G folds g / G into its block scales: blocks where bs' = e4m3(bs * g / G) is
    exact keep their codes; the others take bs' = the smallest e4m3 >= bs * g / G and requantize their
    values to e2m1 (nothing saturates): |x' - x| <= max(bs' G / 4, |x| / 4).
    """
    E, N, K = w.shape
    g = w.global_scale.float()
    if g.shape[1] == 1:
        return QuantizedTensor(w.data.contiguous(), w.scales.contiguous(), w.block, "nvfp4",
                               g.expand(E, 1, 1).contiguous())
    g_rows = g.expand(E, N, 1)[..., 0]  # [E, N]
    G = g_rows.amax(dim=1)  # [E]
    data, scales = w.data.contiguous().clone(), w.scales.contiguous().clone()
    for e in range(E):
        moved = (g_rows[e] != G[e]).nonzero().flatten()
        if not moved.numel():
            continue
        bs = w.scales[e, moved].double()  # [n, K/16]
        old = bs * g_rows[e, moved].double()[:, None]  # bs * g, exact in fp64
        target = old / G[e].double()
        cand = target.float().to(FP8_DTYPE)
        exact = cand.double() * G[e].double() == old
        up = (cand.view(torch.uint8) + (cand.double() < target).to(torch.uint8)).view(FP8_DTYPE)
        new_bs = torch.where(exact, cand.view(torch.uint8), up.view(torch.uint8)).view(FP8_DTYPE)
        packed = w.data[e, moved]
        codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)  # [n, K]
        denom = torch.where(exact, torch.ones_like(old), new_bs.double() * G[e].double())
        factor = torch.where(exact, torch.ones_like(old), old / denom).repeat_interleave(NVFP4_BLOCK, dim=-1)
        y = unpack_e2m1(packed).double() * factor  # old values in units of bs' * G
        requant = round_e2m1(y.abs().float()) | ((y < 0).to(torch.uint8) << 3)
        codes = torch.where(exact.repeat_interleave(NVFP4_BLOCK, dim=-1), codes, requant)
        data[e, moved] = pack_e2m1(codes)
        scales[e, moved] = new_bs
    return QuantizedTensor(data, scales, w.block, "nvfp4", G.reshape(E, 1, 1).contiguous())
