"""Quantize activation rows on the device: the launch wrappers of kernels/quant.py, beside their
plain-torch twins (epmoe.quant, imported here), which they match bit for bit.

    quantize_fp8_groups_triton(x)     twin quantize_fp8_groups_torch: e4m3 + one scale per row and group
    quantize_nvfp4_triton(x, g)       twin quantize_nvfp4_torch: e2m1 pairs + e4m3 block scales + global

`epmoe.quant.quantize_activations` picks between them.
"""

from __future__ import annotations

import torch

from epmoe.ops.launch import launcher
from epmoe.quant import (
    AMAX_EPS,
    FP8_BLOCK,
    FP8_DTYPE,
    NVFP4_BLOCK,
    QuantizedTensor,
    nvfp4_global_scale,
    quantize_fp8_groups_torch,
    quantize_nvfp4_torch,
)
from epmoe.util import cdiv, next_pow2

__all__ = ["quantize_fp8_groups_torch", "quantize_fp8_groups_triton", "quantize_nvfp4_torch", "quantize_nvfp4_triton"]


def _check_activation(x: torch.Tensor, group: int = 1) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"activations must be [T, H] with unit stride in H, got shape {tuple(x.shape)}, "
                         f"strides {x.stride()}; call .contiguous()")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"activations must be bf16/fp16/fp32, got {x.dtype}")
    if x.shape[1] % group:
        raise ValueError(f"hidden size {x.shape[1]} is not a multiple of the quantization group {group}")


def quantize_fp8_groups_triton(x: torch.Tensor, group: int = FP8_BLOCK) -> QuantizedTensor:
    """Triton twin of `quantize_fp8_groups_torch` (bit-exact): [T, H] -> fp8 + [T, H/group] fp32."""
    from epmoe.kernels.quant import fp8_group_quant_kernel

    _check_activation(x)
    T, H = x.shape
    G = cdiv(H, group)
    data = torch.empty(T, H, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(T, G, dtype=torch.float32, device=x.device)
    if T:
        block = next_pow2(group)
        groups = min(next_pow2(G), max(1, 2048 // block))  # up to 2048 values a program
        launcher(fp8_group_quant_kernel)[(T, cdiv(G, groups))](
            x, x.stride(0), data.view(torch.uint8), H, scales, G,
            EPS=AMAX_EPS, GROUP=group, BLOCK=block, GROUPS=groups,
        )
    return QuantizedTensor(data, scales, (1, group), "fp8_block")


def quantize_nvfp4_triton(
    x: torch.Tensor, global_scale: torch.Tensor | None = None, blocks_per_program: int = 8
) -> QuantizedTensor:
    """Triton twin of `quantize_nvfp4_torch` for activations [T, H] (bit-exact). global_scale:
    a static fp32 scalar (checkpoint `input_scale`) or None for amax / (6 * 448) of x."""
    from epmoe.kernels.quant import nvfp4_quant_kernel

    _check_activation(x, NVFP4_BLOCK)
    T, H = x.shape
    if global_scale is None:
        g = nvfp4_global_scale(x) if x.numel() else x.new_ones(1, 1, dtype=torch.float32)
    else:
        if global_scale.numel() != 1:
            raise ValueError("the Triton nvfp4 activation quantizer takes one global scale for the tensor")
        g = global_scale.float().reshape(1, 1).to(x.device)
        if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
            raise ValueError("nvfp4 global scale must be finite and > 0")
    data = torch.empty(T, H // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(T, H // NVFP4_BLOCK, dtype=FP8_DTYPE, device=x.device)
    nb = H // NVFP4_BLOCK
    if T:
        launcher(nvfp4_quant_kernel)[(T, cdiv(nb, blocks_per_program))](
            x, x.stride(0), data, H // 2, scales.view(torch.uint8), nb, g,
            BLOCKS=blocks_per_program,
        )
    return QuantizedTensor(data, scales, (1, NVFP4_BLOCK), "nvfp4", g.contiguous())
