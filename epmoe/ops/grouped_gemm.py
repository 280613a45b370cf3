"""Grouped GEMM over local experts: the launch wrappers of kernels/grouped_gemm.py.

    moe_gate_up: for each block of slots (pair mode: each pair) of expert e, columns n of I:
                     act[slot] = ACT(x[row_ids[pair]] @ w13[e, n].T + b13[e, n])   (gate and up halves)
    moe_down:    out[pair] = act[slot] @ w2[e].T + b2[e]                            (rows land in pair order)

The slots come from a `Permutation` (ops/permute.py); pair mode is the Permutation of block_m 1
whose slot tensors are the expert ids (not read). Weights are plain [E, N, K] float stacks or
epmoe.quant QuantizedTensor stacks (fp8, fp8_block, nvfp4; see kernels/grouped_gemm.py for how
each multiplies). nvfp4 weights can instead be decoded a chunk of experts at a time into a scratch
buffer (`decode_chunks`, the twin of `QuantizedTensor.dequantize`) and multiplied as floats.
The plain-torch twin of the whole stage is `reference_experts` (experts/reference.py).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from epmoe.ops.launch import launcher
from epmoe.ops.permute import Permutation
from epmoe.quant import AMAX_EPS, FP8_BLOCK, QuantizedTensor
from epmoe.util import cdiv

if TYPE_CHECKING:
    from epmoe.config import MoEConfig
    from epmoe.experts.tuning import ExpertsConfig, GemmConfig

ACT_CODES = {"silu": 0, "gelu": 1, "swiglu_clamped": 2}
WEIGHT_FORMAT_CODES = {"bf16": 0, "fp8": 1, "fp8_block": 2, "nvfp4": 3}


def weight_args(w: Any) -> tuple[Any, ...]:
    """(data, stride_e, stride_n, scales, 3 scale strides, global, global stride, format code);
    broadcast (size-1) scale dims get stride 0."""
    if isinstance(w, torch.Tensor):
        return (w, w.stride(0), w.stride(1), w, 0, 0, 0, w, 0, 0)
    sc = w.scales
    st = [0 if sc.shape[d] == 1 else sc.stride(d) for d in range(3)]
    g = w.global_scale if w.global_scale is not None else sc
    sg = 0 if w.global_scale is None or g.shape[0] == 1 else g.stride(0)
    return (w.data, w.data.stride(0), w.data.stride(1), sc, *st, g, sg, WEIGHT_FORMAT_CODES[w.format])


def quantized_tiles(config: ExpertsConfig, fmt_code: int) -> tuple[GemmConfig, GemmConfig]:
    """The (gate_up, down) tiles the kernels can run for a weight format (see grouped_gemm.py):
      fp8 / fp8_block, sorted: 128 deep (one activation scale per k step); gate_up 128 wide (its
        epilogue quantizes one 128-value group per program), 8 warps from 64-row tiles on (two
        [BLOCK_M, 128] fp32 accumulators).
      pair mode, quantized: twice as deep as the bf16 tile (fp8_block: whole 128-value blocks).
      nvfp4, sorted: at least 32 deep (a 16-deep dot per parity), at most 2 stages (dequantized
        tiles are staged in shared memory again).
    """
    g, d = config.gate_up, config.down
    if fmt_code in (1, 2) and not config.pair_mode:
        warps = 8 if config.block_m >= 64 else 4
        g = dataclasses.replace(g, block_n=128, block_k=FP8_BLOCK, num_warps=warps)
        d = dataclasses.replace(d, block_k=FP8_BLOCK, num_warps=max(d.num_warps, warps))
    elif config.pair_mode and fmt_code:
        # decode streams weights: a quantized tile as deep as the bf16 tile in *bytes* would have
        # too many values to decode per thread; twice as deep keeps as many bytes in flight for
        # fp8 and half as many for nvfp4. fp8_block tiles are whole 128-value blocks.
        def deeper(c: GemmConfig) -> GemmConfig:
            bk = 2 * c.block_k
            return dataclasses.replace(c, block_k=max(bk, FP8_BLOCK) if fmt_code == 2 else bk)

        g, d = deeper(g), deeper(d)
    elif fmt_code == 3:
        g = dataclasses.replace(g, block_k=max(g.block_k, 32), num_stages=min(g.num_stages, 2))
        d = dataclasses.replace(d, block_k=max(d.block_k, 32), num_stages=min(d.num_stages, 2))
    return g, d


def _tma_ok(w: torch.Tensor) -> bool:
    """The bulk copy engine needs 16-byte aligned base and row strides (else: plain loads)."""
    size = w.element_size()
    return w.data_ptr() % 16 == 0 and all((st * size) % 16 == 0 for st in w.stride()[:-1])


def _descriptor(w: torch.Tensor, g: GemmConfig) -> Any:
    """Host-side tensor descriptor of a [E, N, K] weight, one [BLOCK_N, BLOCK_K] tile of one expert."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(w, [1, g.block_n, g.block_k])


_SCRATCH = threading.local()  # .bufs: {(device, dtype): tensor}, one set per thread
_GRAPH_HELD: list[torch.Tensor] = []  # scratch buffers a CUDA graph captured: never freed


def dequant_scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The scratch of nvfp4 prefill for this thread on `device` (at least `numel` values of
    `dtype`). One buffer per thread, device and dtype serves every layer: one thread's calls run
    one after the other on its stream, while threads (virtual ranks) interleave their launches,
    so they must not share it. A buffer a CUDA graph captured is kept alive for good (the graph
    writes to it on every replay); an outgrown one that no graph holds is freed."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    key = (device, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    if buf.is_cuda and torch.cuda.is_current_stream_capturing() and not any(b is buf for b in _GRAPH_HELD):
        _GRAPH_HELD.append(buf)
    return buf


def chunk_experts(num_experts: int, n: int, k: int, dtype: torch.dtype, scratch_mb: float) -> int:
    """Experts per chunk of the dequantization scratch: as many [n, k] experts as fit in
    scratch_mb megabytes, at least one."""
    per_expert = n * k * dtype.itemsize
    return max(1, min(num_experts, int(scratch_mb * 2**20 // per_expert)))


def decodes(w: Any, scratch_mb: float | None) -> bool:
    """Whether a GEMM over `w` decodes it into the scratch first (nvfp4 weights and a scratch cap)."""
    return scratch_mb is not None and isinstance(w, QuantizedTensor) and w.format == "nvfp4"


def decode_chunks(w: Any, dtype: torch.dtype | None, scratch_mb: float | None) -> Iterator[tuple[Any, ...]]:
    """(kernel weight args, e_lo, e_hi, decoded) per launch of a GEMM: the weights as they are,
    once (scratch_mb None, or weights other than nvfp4); or chunks of experts decoded into this
    thread's scratch (at most scratch_mb megabytes, at least one expert), each right before its
    launch (the scratch is reused chunk after chunk, stream-ordered). dtype: the scratch's (read
    only when decoding)."""
    from epmoe.kernels.grouped_gemm import nvfp4_dequant_kernel

    E = w.shape[0]
    if not decodes(w, scratch_mb):
        yield weight_args(w), 0, E, False
        return
    _, N, K = w.shape
    chunk = chunk_experts(E, N, K, dtype, scratch_mb)
    buf = dequant_scratch(w.data.device, dtype, chunk * N * K)
    _, se, sn, sc, ss_e, ss_n, ss_k, gl, sg, _ = weight_args(w)
    bn, bk = 32, 512  # measured on H200: 3.96 TB/s of bytes read + written (32 x 256: 3.5)
    for e_lo in range(0, E, chunk):
        e_hi = min(E, e_lo + chunk)
        view = buf[:(e_hi - e_lo) * N * K].view(e_hi - e_lo, N, K)
        launcher(nvfp4_dequant_kernel)[(cdiv(N, bn) * cdiv(K, bk), e_hi - e_lo)](
            w.data, se, sn, sc, ss_e, ss_n, ss_k, view, view.stride(0), view.stride(1), e_lo, N, K,
            FAST_E2M1=view.is_cuda, BLOCK_N=bn, BLOCK_K=bk, num_warps=8)
        yield (view, view.stride(0), view.stride(1), sc, 0, 0, 0, gl, sg, 0), e_lo, e_hi, True


def _weight_launches(w: Any, tile: GemmConfig, dtype: torch.dtype | None, pair_mode: bool,
                     scratch_mb: float | None) -> Iterator[tuple[tuple[Any, ...], int, int, dict[str, Any]]]:
    """(weight kernel args, e_lo, e_hi, weight constexprs) per launch of a GEMM over `w` (see
    decode_chunks); the weights go through the bulk copy engine where the tile asks for it and
    they allow it (sorted mode, fp8 / float data, aligned)."""
    for (data, s_e, s_n, *q, f), e_lo, e_hi, decoded in decode_chunks(w, dtype, scratch_mb):
        tma = tile.tma and not pair_mode and f in (0, 1, 2) and _tma_ok(data)
        args = (data, s_e, s_n, _descriptor(data, tile) if tma else data, *q)
        yield args, e_lo, e_hi, {"W_TMA": tma, "W_FMT": f, "W_GLOBAL": decoded}


def weight_launch(w: Any, tile: GemmConfig, pair_mode: bool, scratch_mb: float | None
                  ) -> tuple[tuple[Any, ...], int, int, dict[str, Any]] | None:
    """The one launch's weight arguments of a GEMM over `w` (as `_weight_launches` yields them),
    for a caller to keep and pass back as `launch=`; None where each call decodes nvfp4 weights
    into the scratch first (the arguments then change per chunk)."""
    return None if decodes(w, scratch_mb) else next(_weight_launches(w, tile, None, pair_mode, None))


def moe_gate_up(x: torch.Tensor, x_scales: tuple[torch.Tensor, int, int] | None, row_ids: torch.Tensor,
                expert_ids: torch.Tensor, perm: Permutation, w13: Any, b13: torch.Tensor | None,
                act: torch.Tensor, act_scales: torch.Tensor | None, cfg: MoEConfig, tile: GemmConfig, *,
                dot_prec: str, pdl: bool = False, scratch_mb: float | None = None,
                launch: tuple[Any, ...] | None = None) -> None:
    """act [slots, I] = ACT(x rows @ w13.T + b13) per slot of `perm` (see the module docstring).

    x [N, H]; x_scales (w8a8: x holds e4m3 rows): (fp32 scales, row stride, 128-group stride),
    and act_scales [slots, I / 128] fp32 receives the scales of act, quantized to e4m3 in the
    epilogue. dot_prec: "ieee" (fp32) or "tf32". pdl: programmatic dependent launch (GPU pair
    mode). scratch_mb: decode nvfp4 weights into a scratch of this many MB (see decode_chunks).
    launch: the weights' arguments kept from `weight_launch` (None: computed here)."""
    from epmoe.kernels.grouped_gemm import moe_gate_up_kernel

    E, I, H, g = w13.shape[0], cfg.intermediate, cfg.hidden, tile
    a_fp8 = x_scales is not None
    xs, stride_xsm, stride_xsg = x_scales if a_fp8 else (x, 0, 0)
    act_s = act if act_scales is None else act_scales
    has_bias = b13 is not None
    b = b13 if has_bias else act_s  # not read without biases
    num_m, pair_mode = perm.max_blocks, perm.pair_mode
    launches = [launch] if launch is not None else _weight_launches(w13, g, act.dtype, pair_mode, scratch_mb)
    for w_args, e_lo, e_hi, w_flags in launches:
        launcher(moe_gate_up_kernel)[(num_m * cdiv(I, g.block_n),)](
            x, x.stride(0), xs, stride_xsm, stride_xsg, *w_args, b, b.stride(0) if has_bias else 0,
            act, act.stride(0), act_s, act_s.stride(0), row_ids, expert_ids, perm.sorted_pair, perm.block_expert,
            perm.expert_end, num_m, E, e_lo, e_hi, I, H, float(cfg.swiglu_limit), float(cfg.swiglu_alpha), AMAX_EPS,
            ACT=ACT_CODES[cfg.activation], HAS_BIAS=has_bias, PAIR_MODE=pair_mode, DOT_PREC=dot_prec,
            USE_PDL=pdl, A_FP8=a_fp8, W_UNIFORM=I % FP8_BLOCK == 0, FAST_E2M1=act.is_cuda, **w_flags,
            BLOCK_M=perm.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m,
            num_warps=g.num_warps, num_stages=g.num_stages,
        )


def moe_down(act: torch.Tensor, act_scales: torch.Tensor | None, expert_ids: torch.Tensor, perm: Permutation,
             w2: Any, b2: torch.Tensor | None, out: torch.Tensor, cfg: MoEConfig, tile: GemmConfig, *,
             dot_prec: str, pdl: bool = False, scratch_mb: float | None = None,
             launch: tuple[Any, ...] | None = None) -> None:
    """out [M, H] = act @ w2.T + b2, each slot's row written at its pair (padding pairs: untouched).
    act_scales: act holds e4m3 values with these scales (w8a8); other arguments as moe_gate_up."""
    from epmoe.kernels.grouped_gemm import moe_down_kernel

    E, H, I, d = w2.shape[0], cfg.hidden, cfg.intermediate, tile
    a_fp8 = act_scales is not None
    act_s = act if act_scales is None else act_scales
    has_bias = b2 is not None
    b = b2 if has_bias else out  # not read without biases
    num_m, pair_mode = perm.max_blocks, perm.pair_mode
    launches = [launch] if launch is not None else _weight_launches(w2, d, out.dtype, pair_mode, scratch_mb)
    for w_args, e_lo, e_hi, w_flags in launches:
        launcher(moe_down_kernel)[(num_m * cdiv(H, d.block_n),)](
            act, act.stride(0), act_s, act_s.stride(0), *w_args, b, b.stride(0) if has_bias else 0,
            out, out.stride(0), expert_ids, perm.sorted_pair, perm.block_expert, perm.expert_end,
            num_m, E, e_lo, e_hi, H, I,
            HAS_BIAS=has_bias, PAIR_MODE=pair_mode, DOT_PREC=dot_prec, USE_PDL=pdl,
            A_FP8=a_fp8, W_UNIFORM=FP8_BLOCK % d.block_n == 0, FAST_E2M1=out.is_cuda, **w_flags,
            BLOCK_M=perm.block_m, BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=d.group_m,
            num_warps=d.num_warps, num_stages=d.num_stages, **({"launch_pdl": True} if pdl else {}),
        )
