"""nvfp4 weights decoded in registers by the Gluon kernels (Hopper and newer): the launch
wrappers of kernels/nvfp4_decode.py (CUDA-core, pair mode) and kernels/nvfp4_mma.py (tensor
cores, pair mode and sorted blocks of up to 32 rows).

    nvfp4_decode_pairs: act[p] = ACT(x[row_ids[p]] @ w13[e].T + b13[e]); out[p] = act[p] @ w2[e].T + b2[e]
    nvfp4_mma:          the same per pair or per sorted block of a Permutation (act in slot order)

The weights are epmoe.quant nvfp4 stacks whose data reads as 32-bit words (`words_ok`); they
are never decoded to memory. Their plain-torch twin is `reference_experts` (experts/reference.py)
on the same stacks (it dequantizes exactly).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from epmoe.ops.grouped_gemm import ACT_CODES, weight_args
from epmoe.ops.launch import launcher
from epmoe.ops.permute import Permutation
from epmoe.util import cdiv

if TYPE_CHECKING:
    from epmoe.config import MoEConfig
    from epmoe.experts.tuning import GemmConfig


def _decode_tile(c: GemmConfig) -> dict[str, Any]:
    """Launch parameters of a CUDA-core Gluon nvfp4 kernel for a tile: TG threads of a warp along
    the tile's 16-value blocks, the rest along its rows; num_stages > 1 loads one k step ahead."""
    if c.block_k < 16 or c.block_k & (c.block_k - 1) or c.block_n & (c.block_n - 1):
        raise ValueError(f"nvfp4 decode tiles need power-of-two sizes and block_k >= 16, got {c}")
    return {"BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "TG": min(32, c.block_k // 16), "num_warps": c.num_warps,
            "PREFETCH": c.num_stages > 1}


def words_ok(w: torch.Tensor) -> bool:
    """Whether a uint8 [E, N, K/2] stack reads as 32-bit words: 4-byte aligned base and strides."""
    return w.data_ptr() % 4 == 0 and w.shape[-1] % 4 == 0 and all(st % 4 == 0 for st in w.stride()[:-1])


def _word_args(w: Any, b: torch.Tensor | None) -> tuple[Any, ...]:
    """Kernel arguments of an nvfp4 stack for the Gluon kernels: the data as 32-bit words of eight
    values (strides in words), scales and their strides, global scale and its stride, bias and its
    row stride (the global scale and 0 without biases)."""
    data, se, sn, sc, sse, ssn, ssk, g, sg, _ = weight_args(w)
    return (data.view(torch.int32), se // 4, sn // 4, sc, sse, ssn, ssk, g, sg,
            g if b is None else b, 0 if b is None else b.stride(0))


def nvfp4_decode_pairs(x: torch.Tensor, row_ids: torch.Tensor, expert_ids: torch.Tensor, w13: Any,
                       b13: torch.Tensor | None, w2: Any, b2: torch.Tensor | None, cfg: MoEConfig,
                       act: torch.Tensor, out: torch.Tensor, g: GemmConfig, d: GemmConfig, pdl: bool) -> None:
    """Pair-mode nvfp4 through the CUDA-core Gluon kernels: act [M, I] then out [M, H], both in pair order."""
    from epmoe.kernels.nvfp4_decode import nvfp4_decode_down_kernel, nvfp4_decode_gate_up_kernel

    E, H, I, M = w13.shape[0], cfg.hidden, cfg.intermediate, expert_ids.shape[0]
    has_bias = b13 is not None
    (w13, se13, sn13, s13, sse13, ssn13, ssk13, g13, sg13, b13, sb13), \
        (w2, se2, sn2, s2, sse2, ssn2, ssk2, g2, sg2, b2, sb2) = _word_args(w13, b13), _word_args(w2, b2)
    launcher(nvfp4_decode_gate_up_kernel)[(M * cdiv(I, g.block_n),)](
        x, x.stride(0), row_ids, expert_ids, w13, se13, sn13, s13, sse13, ssn13, ssk13, g13, sg13,
        b13, sb13, act, act.stride(0), E, I, H,
        float(cfg.swiglu_limit), float(cfg.swiglu_alpha),
        ACT=ACT_CODES[cfg.activation], HAS_BIAS=has_bias, USE_PDL=pdl, **_decode_tile(g))
    launcher(nvfp4_decode_down_kernel)[(M * cdiv(H, d.block_n),)](
        act, act.stride(0), expert_ids, w2, se2, sn2, s2, sse2, ssn2, ssk2, g2, sg2,
        b2, sb2, out, out.stride(0), E, H, I,
        HAS_BIAS=has_bias, USE_PDL=pdl, **_decode_tile(d), **({"launch_pdl": True} if pdl else {}))


def mma_tile_ok(c: GemmConfig) -> bool:
    """Whether the tensor-core nvfp4 kernels take this tile: block_n a power of two and a multiple
    of 16 rows per warp, block_k a power of two of at least 64 values."""
    return not (c.block_n & (c.block_n - 1) or c.block_n % (16 * c.num_warps) or c.block_k < 64
                or c.block_k & (c.block_k - 1))


def mma_tile(c: GemmConfig, K: int) -> GemmConfig:
    """The tile the tensor-core nvfp4 kernels run for reduction length K: block_k halved while that
    makes it divide K (so the k loop runs without masks)."""
    if not mma_tile_ok(c):
        raise ValueError(f"nvfp4 tensor-core tiles need block_n a power-of-two multiple of 16 x num_warps and "
                         f"block_k a power of two >= 64, got {c}")
    bk = c.block_k
    while bk > 64 and K % bk:
        bk //= 2
    return dataclasses.replace(c, block_k=bk if K % bk == 0 else c.block_k)


def nvfp4_mma(x: torch.Tensor, row_ids: torch.Tensor, expert_ids: torch.Tensor, perm: Permutation, w13: Any,
              b13: torch.Tensor | None, w2: Any, b2: torch.Tensor | None, cfg: MoEConfig, act: torch.Tensor,
              out: torch.Tensor, g: GemmConfig, d: GemmConfig, pdl: bool) -> None:
    """nvfp4 through the tensor-core decode kernels (kernels/nvfp4_mma.py): pair mode (perm of
    block_m 1, act in pair order) or sorted blocks of block_m <= 32 slots (act in slot order);
    out [M, H] in pair order."""
    from epmoe.kernels.nvfp4_mma import nvfp4_mma_down_kernel, nvfp4_mma_gate_up_kernel

    E, H, I = w13.shape[0], cfg.hidden, cfg.intermediate
    has_bias = b13 is not None
    (w13, se13, sn13, s13, sse13, ssn13, ssk13, g13, sg13, b13, sb13), \
        (w2, se2, sn2, s2, sse2, ssn2, ssk2, g2, sg2, b2, sb2) = _word_args(w13, b13), _word_args(w2, b2)
    g, d = mma_tile(g, H), mma_tile(d, I)
    num_m, sorted_pair = perm.max_blocks, perm.sorted_pair
    block_expert, expert_end = perm.block_expert, perm.expert_end
    common = {"PAIR_MODE": perm.pair_mode, "USE_PDL": pdl, "BLOCK_M": perm.block_m}
    launcher(nvfp4_mma_gate_up_kernel)[(num_m * cdiv(I, g.block_n),)](
        x, x.stride(0), row_ids, expert_ids, sorted_pair, block_expert, expert_end,
        w13, se13, sn13, s13.view(torch.uint8), sse13, ssn13, ssk13, g13, sg13, b13, sb13, act, act.stride(0),
        E, I, H, float(cfg.swiglu_limit), float(cfg.swiglu_alpha),
        ACT=ACT_CODES[cfg.activation], HAS_BIAS=has_bias, EVEN_K=H % g.block_k == 0, **common,
        PREFETCH=g.num_stages > 1, BLOCK_N=g.block_n, BLOCK_K=g.block_k, num_warps=g.num_warps)
    launcher(nvfp4_mma_down_kernel)[(num_m * cdiv(H, d.block_n),)](
        act, act.stride(0), expert_ids, sorted_pair, block_expert, expert_end,
        w2, se2, sn2, s2.view(torch.uint8), sse2, ssn2, ssk2, g2, sg2, b2, sb2, out, out.stride(0), E, H, I,
        HAS_BIAS=has_bias, EVEN_K=I % d.block_k == 0, **common,
        PREFETCH=d.num_stages > 1, BLOCK_N=d.block_n, BLOCK_K=d.block_k, num_warps=d.num_warps,
        **({"launch_pdl": True} if pdl else {}))
