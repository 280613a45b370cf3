"""Triton expert runner: device-side sort + two grouped GEMMs, no host sync.

    sort:     pairs grouped by local expert into BLOCK_M-aligned slots     (ops/permute.py)
    gate_up:  act[s] = ACT(hidden[row_ids[pair[s]]] @ w13[e].T + b13[e])  (ops/grouped_gemm.py)
    down:     out[pair[s]] = act[s] @ w2[e].T + b2[e]                     (rows land in pair order)

At decode (a few pairs) the sort is skipped: each program takes one pair, reads its expert from
`expert_ids` and streams that expert's weights (PAIR_MODE), so the stage is two launches.

Weights: bf16/fp16/fp32 tensors in the activation dtype, or epmoe.quant `QuantizedTensor`
stacks ("fp8" per expert/tensor scale, "fp8_block" 128x128 scales, "nvfp4"); see
kernels/grouped_gemm.py for how each format multiplies:
    pair mode (decode)        weight-only: tiles dequantized in registers, bf16 activations
    sorted, fp8 / fp8_block   w8a8 on the fp8 tensor cores: hidden rows quantized per token and
                              128 values (an fp8 / fp8_block payload is used as it arrived), the
                              activation between the GEMMs likewise (`activation_quant`)
    sorted, nvfp4             exact bf16 dequantization of each tile, bf16 tensor cores; on
                              Hopper with bf16 activations, the Gluon decode kernels instead
                              (ops/nvfp4.py, blocks of up to 32 rows, also most of pair
                              mode; see tuning.gluon_decode), and from many rows per expert the
                              experts decoded once into a bf16 scratch
Other quantized payloads are dequantized once before the GEMMs.

Every buffer size follows from the pair count M alone, so a call can be captured in a CUDA
graph. Kernel configs come from `select_config` (experts/tuning.py: tuned tables per GPU model,
else a heuristic). This module is the policy (which kernels and tiles a call runs, checks,
options); the launches are in epmoe/ops/. `reference_experts` (experts/reference.py) is the
plain-torch twin of the whole stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from epmoe.comm.base import Dispatched
from epmoe.config import MoEConfig
from epmoe.experts.base import ExpertRunner, ExpertWeights, register_runner, weight_family
from epmoe.experts.triton_prepare import prepare_triton
from epmoe.experts.tuning import (
    ExpertsConfig,
    GemmConfig,
    bucket_pairs,
    default_config,
    gluon_decode,
    nvfp4_decode_choice,
    nvfp4_mma_pairs,
    nvfp4_sorted_kernels,
    select_config,
)
from epmoe.experts.tuning import tuning_dir as user_tuning_dir
from epmoe.ops.grouped_gemm import (
    WEIGHT_FORMAT_CODES,
    chunk_experts,
    moe_down,
    moe_gate_up,
    quantized_tiles,
    weight_launch,
)
from epmoe.ops.nvfp4 import mma_tile_ok, nvfp4_decode_pairs, nvfp4_mma, words_ok
from epmoe.ops.permute import Permutation, permute
from epmoe.ops.quant import quantize_fp8_groups_triton
from epmoe.quant import FP8_BLOCK, QuantizedTensor
from epmoe.util import cdiv

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# w8a8 m tiles: gate_up keeps two [BLOCK_M, 128] fp32 accumulators and a dot result live; at 128
# rows that is ~192 registers a thread with 8 warps (spills), at 64 rows half.
FP8_MAX_BLOCK_M = 64
# nvfp4 prefill decodes whole experts into a scratch (see tuning.NVFP4_DEQUANT_MIN_RPE): its default cap
DEQUANT_SCRATCH_MB = 1024  # (EPMOE_DEQUANT_SCRATCH_MB), one per device and thread


# ---------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------


def dequant_scratch_mb(raw: Any, name: str = "dequant_scratch_mb") -> float:
    """`raw` as a scratch cap in megabytes: a finite number > 0, else a ValueError naming `name`."""
    try:
        mb = float(raw)
    except (TypeError, ValueError):
        mb = math.nan
    if not (math.isfinite(mb) and mb > 0):
        raise ValueError(f"{name}={raw!r} must be a number of megabytes, finite and > 0 (default "
                         f"{DEQUANT_SCRATCH_MB})")
    return mb


def _env_scratch_mb() -> float:
    raw = os.environ.get("EPMOE_DEQUANT_SCRATCH_MB")
    return DEQUANT_SCRATCH_MB if raw is None else dequant_scratch_mb(raw, "EPMOE_DEQUANT_SCRATCH_MB")


@dataclass(frozen=True)
class TritonOptions:
    """Options of the triton runner. Each default is read from its environment variable when the
    options are built (a runner builds its options once, at construction):

    nvfp4_decode:       EPMOE_NVFP4_DECODE, one of NVFP4_DECODE_CHOICES (default "gluon"): which
                        kernels decode nvfp4 weights (see gluon_decode).
    dequant_scratch_mb: EPMOE_DEQUANT_SCRATCH_MB, a finite number > 0 (default DEQUANT_SCRATCH_MB):
                        the cap of nvfp4 prefill's decoded-weights scratch (see scratch_experts).
    tuning_dir:         EPMOE_TUNING_DIR (default ~/.cache/epmoe): the tuned tables written by
                        `python -m epmoe.bench.experts --tune`, read before the shipped ones.
    Invalid values raise ValueError naming the variable (or field) and the valid values.
    """

    nvfp4_decode: str = field(default_factory=nvfp4_decode_choice)
    dequant_scratch_mb: float = field(default_factory=_env_scratch_mb)
    tuning_dir: Path = field(default_factory=user_tuning_dir)

    def __post_init__(self) -> None:
        nvfp4_decode_choice(self.nvfp4_decode)
        object.__setattr__(self, "dequant_scratch_mb", dequant_scratch_mb(self.dequant_scratch_mb))
        object.__setattr__(self, "tuning_dir", Path(self.tuning_dir))


def scratch_experts(num_experts: int, n: int, k: int, dtype: torch.dtype, scratch_mb: float | None = None) -> int:
    """Experts per chunk of the dequantization scratch: as many [n, k] experts as fit in
    scratch_mb megabytes (None: TritonOptions' default, EPMOE_DEQUANT_SCRATCH_MB or
    DEQUANT_SCRATCH_MB), at least one."""
    return chunk_experts(num_experts, n, k, dtype, _env_scratch_mb() if scratch_mb is None else scratch_mb)


# ---------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------


def _check_quantized(name: str, w: Any, E: int, N: int, K: int) -> None:
    """Layout the kernels read for a quantized weight stack [E, N, K] (see kernels/grouped_gemm.py)."""
    fmt = w.format
    if fmt not in WEIGHT_FORMAT_CODES:
        raise ValueError(f"{name}: the triton runner computes {sorted(WEIGHT_FORMAT_CODES)} weights, not {fmt}")
    if tuple(w.shape) != (E, N, K) or w.data.stride(-1) != 1:
        raise ValueError(f"{name} must be a [{E}, {N}, {K}] {fmt} stack with contiguous rows, got {tuple(w.shape)}")
    sc = w.scales
    if fmt == "fp8" and tuple(sc.shape[1:]) != (1, 1):
        raise ValueError(f"{name}: fp8 needs one scale per expert or per tensor, got scales {tuple(sc.shape)}")
    # per dim: the kernels read a broadcast (size-1) scale dim or the format's fixed block
    fixed = {"fp8_block": (128, 128), "nvfp4": (1, 16)}.get(fmt)
    if fixed and any(sc.shape[d] != 1 and w.block[d] != fixed[d - 1] for d in (1, 2)):
        raise ValueError(f"{name}: {fmt} scales must cover blocks of {fixed[0]}x{fixed[1]} (or broadcast), "
                         f"got block {w.block}, scales {tuple(sc.shape)}; requantize with epmoe.quant")
    if fmt == "nvfp4":
        g = w.global_scale
        if g is None or g.dim() != 3 or tuple(g.shape[1:]) != (1, 1):
            raise ValueError(f"{name}: nvfp4 needs a global scale per expert or per tensor ([E or 1, 1, 1])")


def _check(hidden: torch.Tensor, row_ids: torch.Tensor, expert_ids: torch.Tensor, weights: ExpertWeights,
           cfg: MoEConfig, out: torch.Tensor | None) -> None:
    E, I, H = weights.w13.shape[0], cfg.intermediate, cfg.hidden
    hidden_in = hidden
    if isinstance(hidden, QuantizedTensor):
        if hidden.dim() != 2 or hidden.shape[1] != H or hidden.data.stride(-1) != 1:
            raise ValueError(f"hidden must be [N, {H}] with contiguous rows, got a quantized {tuple(hidden.shape)}")
        hidden = hidden.data[:, :0]  # only its device and dtype are checked below
    elif not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a bf16, fp16 or fp32 tensor or a QuantizedTensor, got "
                         f"{getattr(hidden, 'dtype', type(hidden).__name__)}")
    for name, w, N, K in (("w13", weights.w13, 2 * I, H), ("w2", weights.w2, H, I)):
        if w.device != hidden.device:
            raise ValueError(f"{name} is on {w.device}, hidden on {hidden.device}")
        if not isinstance(w, torch.Tensor):
            _check_quantized(name, w, E, N, K)
            continue
        if hidden.dtype in FLOAT_DTYPES and w.dtype != hidden.dtype:
            raise ValueError(f"{name} is {w.dtype} but hidden is {hidden.dtype}; cast one to match")
        if w.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dim; pass {name}.contiguous()")
        if tuple(w.shape) != (E, N, K):
            raise ValueError(f"weights must be w13 [E, {2 * I}, {H}], w2 [E, {H}, {I}]; got "
                             f"{tuple(weights.w13.shape)}, {tuple(weights.w2.shape)}")
    if hidden.dtype in FLOAT_DTYPES and (hidden.dim() != 2 or hidden.shape[1] != H or hidden.stride(-1) != 1):
        raise ValueError(f"hidden must be [N, {H}] with a contiguous last dim, got {tuple(hidden.shape)}")
    fmts = [w.format if isinstance(w, QuantizedTensor) else "float" for w in (weights.w13, weights.w2)]
    if fmts[0] != fmts[1]:
        raise ValueError(f"w13 is {fmts[0]} but w2 is {fmts[1]}: the triton runner takes both stacks in one "
                         f"format; quantize them alike (or use runner='reference')")
    for name, shape in (("b13", (E, 2 * I)), ("b2", (E, H))):
        b = getattr(weights, name)
        if b is not None and (tuple(b.shape) != shape or b.dtype != torch.float32 or not b.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32 [{shape[0]}, {shape[1]}] tensor")
    if (weights.b13 is None) != (weights.b2 is None):
        raise ValueError("pass both biases b13 and b2, or neither")
    for name, t in (("row_ids", row_ids), ("expert_ids", expert_ids)):
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous() or t.device != hidden.device:
            raise ValueError(f"{name} must be a contiguous int32 [M] tensor on {hidden.device}")
    M = expert_ids.shape[0]
    if row_ids.shape[0] != M:
        raise ValueError(f"row_ids has {row_ids.shape[0]} pairs, expert_ids {M}")
    dtype = out_dtype_for(hidden_in, weights)
    if out is not None and (tuple(out.shape) != (M, H) or out.dtype != dtype or out.stride(-1) != 1):
        raise ValueError(f"out must be [{M}, {H}] {dtype} with a contiguous last dim")


def activation_quant(weight_format: str, config: ExpertsConfig) -> str | None:
    """How the runner quantizes activations for `config`: "fp8_block" (per token and 128 values,
    w8a8 on the fp8 tensor cores) for fp8 / fp8_block weights in sorted mode, else None (the
    activations stay in their float dtype). `reference_experts(..., act_quant=...)` is its twin."""
    return "fp8_block" if weight_format in ("fp8", "fp8_block") and not config.pair_mode else None


def out_dtype_for(hidden: Any, weights: ExpertWeights) -> torch.dtype:
    """The dtype of the runner's output rows: the activations', else the weights' float dtype,
    else bf16 on GPUs and fp32 on the CPU (quantized payload and weights)."""
    if isinstance(hidden, torch.Tensor):
        return hidden.dtype
    if isinstance(weights.w13, torch.Tensor):
        return weights.w13.dtype
    return torch.bfloat16 if hidden.device.type == "cuda" else torch.float32


def _fp8_rows(hidden: Any) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(e4m3 rows [N, H], fp32 scales, row stride, group stride) with one scale per row
    and 128 values: an fp8_block payload as it is, an fp8 payload (one scale per row or per
    tensor) through broadcast strides, anything else quantized here (quantize_fp8_groups_triton)."""
    if isinstance(hidden, QuantizedTensor) and hidden.format == "fp8_block" and hidden.block[-1] == FP8_BLOCK:
        q = hidden
    elif isinstance(hidden, QuantizedTensor) and hidden.format == "fp8" and hidden.scales.shape[-1] == 1:
        sc = hidden.scales.reshape(-1, 1)
        return hidden.data.view(torch.float8_e4m3fn), sc, 0 if sc.shape[0] == 1 else sc.stride(0), 0
    else:
        x = hidden.dequantize(torch.float32) if isinstance(hidden, QuantizedTensor) else hidden
        q = quantize_fp8_groups_triton(x.contiguous())
    return q.data.view(torch.float8_e4m3fn), q.scales, q.scales.stride(0), q.scales.stride(1)


def _gluon_nvfp4(weights: ExpertWeights, device: torch.device, decode: str) -> bool:
    """Whether these weights run the Gluon nvfp4 kernels on `device`: 32-bit words, block scales
    contiguous along k."""
    return (weights.format == "nvfp4" and gluon_decode(device, decode)
            and all(words_ok(w.data) and w.scales.stride(-1) == 1 for w in (weights.w13, weights.w2)))


@dataclass(frozen=True)
class CallPlan:
    """What one call of M pairs runs, decided on the host once per (M, activation kind, layout) and
    kept by the runner: the tiles, the kernel family and the weight arguments, so a repeated call
    spends its host time on launches only.

    kernels: "mma" (Gluon tensor-core nvfp4), "decode_pairs" (Gluon CUDA-core nvfp4 pairs) or
             "gemm" (the grouped GEMMs of ops/grouped_gemm.py)
    w13 / w2: the weights' kernel arguments (`weight_launch`), None where each call decodes nvfp4
             weights into the scratch first
    """

    config: ExpertsConfig
    kernels: str
    a_fp8: bool
    gate_up: GemmConfig
    down: GemmConfig
    dot_prec: str
    pdl: bool
    scratch_mb: float | None
    out_dtype: torch.dtype
    w13: tuple[Any, ...] | None = None
    w2: tuple[Any, ...] | None = None


def plan_call(weights: ExpertWeights, cfg: MoEConfig, hidden: Any, M: int, device: torch.device,
              options: TritonOptions, config: ExpertsConfig | None = None) -> CallPlan:
    """The `CallPlan` of a call of M > 0 pairs on `hidden` (its dtype, or its quantized format)."""
    decode, E, H, I = options.nvfp4_decode, weights.w13.shape[0], cfg.hidden, cfg.intermediate
    dtype = out_dtype_for(hidden, weights)
    if config is None:
        config = select_config(weight_family(weights.format), M, E, H, I, cfg.top_k, device, decode,
                               options.tuning_dir)
    a_fp8 = activation_quant(weights.format, config) is not None
    if a_fp8 and config.block_m > FP8_MAX_BLOCK_M:
        config = dataclasses.replace(config, block_m=FP8_MAX_BLOCK_M)
    gluon = _gluon_nvfp4(weights, device, decode)
    mma = gluon and not a_fp8 and dtype == torch.bfloat16  # the tensor-core decode kernels multiply bf16
    route = (nvfp4_sorted_kernels(config, mma)
             if weights.format == "nvfp4" and not config.pair_mode and not config.dequant else "")
    if route == "tl-default":
        config = default_config(bucket_pairs(M, cfg.top_k), E, H, I, "nvfp4", pair_mode=False, decode=decode)
    mma_pairs = (config.pair_mode and nvfp4_mma_pairs(bucket_pairs(M, cfg.top_k), H, I, decode)
                 and (decode == "mma" or mma_tile_ok(config.gate_up) and mma_tile_ok(config.down)))
    common = dict(config=config, a_fp8=a_fp8, out_dtype=dtype, dot_prec="ieee" if dtype == torch.float32 else "tf32")
    if mma and (route == "mma" or mma_pairs):
        return CallPlan(kernels="mma", gate_up=config.gate_up, down=config.down, scratch_mb=None,
                        pdl=config.down.pdl and config.pair_mode, **common)
    dequant = config.dequant and not config.pair_mode  # acts on nvfp4 weights (see ops decode_chunks)
    g, d = quantized_tiles(config, 0 if dequant and weights.format == "nvfp4"
                           else WEIGHT_FORMAT_CODES.get(weights.format, 0))
    pdl = d.pdl and config.pair_mode and device.type == "cuda"
    if gluon and config.pair_mode:
        return CallPlan(kernels="decode_pairs", gate_up=g, down=d, scratch_mb=None, pdl=pdl, **common)
    scratch = options.dequant_scratch_mb if dequant else None
    w13 = weight_launch(weights.w13, g, config.pair_mode, scratch)
    w2 = weight_launch(weights.w2, d, config.pair_mode, scratch)
    return CallPlan(kernels="gemm", gate_up=g, down=d, scratch_mb=scratch, pdl=pdl, w13=w13, w2=w2, **common)


def run_plan(plan: CallPlan, hidden: Any, row_ids: torch.Tensor, expert_ids: torch.Tensor,
             weights: ExpertWeights, cfg: MoEConfig, out: torch.Tensor) -> torch.Tensor:
    """Launch `plan` on checked inputs (M > 0): out [M, H], rows in pair order."""
    config, I, w = plan.config, cfg.intermediate, weights
    if plan.a_fp8:
        x, xs, stride_xsm, stride_xsg = _fp8_rows(hidden)
    else:
        x = hidden.dequantize(plan.out_dtype) if isinstance(hidden, QuantizedTensor) else hidden
    if config.pair_mode:  # one slot per pair: the kernels read no slot tensors
        perm = Permutation(expert_ids, expert_ids, expert_ids, 1)
    else:
        perm = permute(expert_ids, w.w13.shape[0], config.block_m)
    slots = perm.max_blocks * perm.block_m
    if plan.a_fp8:  # e4m3 activations with one fp32 scale per slot and 128 values
        act = torch.empty(slots, I, dtype=torch.float8_e4m3fn, device=out.device)
        act_s = torch.empty(slots, cdiv(I, FP8_BLOCK), dtype=torch.float32, device=out.device)
    else:
        act, act_s = torch.empty(slots, I, dtype=plan.out_dtype, device=out.device), None
    g, d = plan.gate_up, plan.down
    if plan.kernels == "mma":
        nvfp4_mma(x, row_ids, expert_ids, perm, w.w13, w.b13, w.w2, w.b2, cfg, act, out, g, d, plan.pdl)
    elif plan.kernels == "decode_pairs":
        nvfp4_decode_pairs(x, row_ids, expert_ids, w.w13, w.b13, w.w2, w.b2, cfg, act, out, g, d, plan.pdl)
    else:
        moe_gate_up(x, (xs, stride_xsm, stride_xsg) if plan.a_fp8 else None, row_ids, expert_ids, perm, w.w13,
                    w.b13, act, act_s, cfg, g, dot_prec=plan.dot_prec, pdl=plan.pdl, scratch_mb=plan.scratch_mb,
                    launch=plan.w13)
        moe_down(act, act_s, expert_ids, perm, w.w2, w.b2, out, cfg, d, dot_prec=plan.dot_prec, pdl=plan.pdl,
                 scratch_mb=plan.scratch_mb, launch=plan.w2)
    return out


def triton_experts(
    hidden: torch.Tensor | QuantizedTensor,
    row_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: ExpertWeights,
    cfg: MoEConfig,
    out: torch.Tensor | None = None,
    config: ExpertsConfig | None = None,
    options: TritonOptions | None = None,
) -> torch.Tensor:
    """hidden [N, H] (bf16/fp16/fp32, or a quantized payload), row_ids / expert_ids [M] int32
    (-1 = padding) -> out [M, H] in `out_dtype_for(hidden, weights)`.

    Same contract as `reference_experts` (with `act_quant=activation_quant(...)`); padding rows
    of `out` are left as they were. options None: `TritonOptions()`
    (its defaults from the environment). `TritonRunner` runs the same with its plans cached.
    """
    _check(hidden, row_ids, expert_ids, weights, cfg, out)
    options = TritonOptions() if options is None else options
    M = expert_ids.shape[0]
    if out is None:
        out = torch.empty(M, cfg.hidden, dtype=out_dtype_for(hidden, weights), device=expert_ids.device)
    if M == 0:
        return out
    plan = plan_call(weights, cfg, hidden, M, out.device, options, config)
    return run_plan(plan, hidden, row_ids, expert_ids, weights, cfg, out)


# plans one runner keeps (distinct pair counts seen); past it the cache starts over
MAX_PLANS = 4096


@register_runner
class TritonRunner(ExpertRunner):
    """Grouped-GEMM runner in Triton; capturable in CUDA graphs (no host sync). The first call of
    each kind (pair count, activation dtype or format, device, strides, out) checks every argument
    and the weights and builds its `CallPlan`; later calls of that kind check the hidden width,
    look the plan up and launch."""

    name = "triton"
    formats = ("bf16", "fp8", "fp8_block", "nvfp4")
    devices = ("cuda",)  # runs on the CPU only through the Triton interpreter (tests)
    needs_host_sync = False
    priority = 10
    Options = TritonOptions

    @classmethod
    def prepare(cls, weights: ExpertWeights, cfg: MoEConfig) -> ExpertWeights:
        """Loaded weights in the kernels' layout (scales merged onto their grid; see triton_prepare.py)."""
        return prepare_triton(weights, cfg)

    def __init__(self, cfg: MoEConfig, weights: ExpertWeights, options: TritonOptions | None = None) -> None:
        if isinstance(weights.w13, torch.Tensor):
            weights = ExpertWeights(weights.w13.contiguous(), weights.w2.contiguous(),
                                    None if weights.b13 is None else weights.b13.float().contiguous(),
                                    None if weights.b2 is None else weights.b2.float().contiguous())
        super().__init__(cfg, weights, options)
        self._plans: dict[tuple[Any, ...], CallPlan] = {}

    def __call__(self, d: Dispatched, out: torch.Tensor | None = None) -> torch.Tensor:
        hidden, w, cfg = d.hidden, self.weights, self.cfg
        row_ids, expert_ids, M = d.row_ids.contiguous(), d.expert_ids.contiguous(), d.expert_ids.shape[0]
        plain = isinstance(hidden, torch.Tensor)
        key = (M, hidden.dtype if plain else hidden.format, hidden.device,
               expert_ids.device, hidden.stride(-1) if plain else hidden.data.stride(-1),
               out is None or (out.shape, out.dtype, out.stride(-1)))
        plan = self._plans.get(key)
        if plan is None:  # the first call of its kind: every check, then the plan
            if plain and isinstance(w.w13, torch.Tensor) and w.w13.dtype != hidden.dtype:
                raise ValueError(f"hidden is {hidden.dtype} but the weights are {w.w13.dtype}; build the layer "
                                 f"with weights in the activation dtype")
            _check(hidden, row_ids, expert_ids, w, cfg, out)
            if M == 0:
                return torch.empty(0, cfg.hidden, dtype=out_dtype_for(hidden, w), device=expert_ids.device) \
                    if out is None else out
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = plan_call(w, cfg, hidden, M, expert_ids.device, self.options)
        elif hidden.shape[-1] != cfg.hidden or hidden.dim() != 2:  # what the key does not pin
            raise ValueError(f"hidden must be [N, {cfg.hidden}], got {tuple(hidden.shape)}")
        if out is None:
            out = torch.empty(M, cfg.hidden, dtype=plan.out_dtype, device=expert_ids.device)
        return run_plan(plan, hidden, row_ids, expert_ids, w, cfg, out)
