"""Triton expert runner: device-side sort + two grouped GEMMs, no host sync.

    sort:     pairs grouped by local expert into BLOCK_M-aligned slots     (kernels/permute.py)
    gate_up:  act[s] = ACT(hidden[row_ids[pair[s]]] @ w13[e].T + b13[e])  (kernels/grouped_gemm.py)
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
                              (kernels/nvfp4_mma.py, blocks of up to 32 rows, also most of pair
                              mode; see gluon_decode), and from many rows per expert the
                              experts decoded once into a bf16 scratch
Other quantized payloads are dequantized once before the GEMMs.

Every buffer size follows from the pair count M alone, so a call can be captured in a CUDA
graph. Kernel configs come from `select_config`: a tuned table keyed by (weight format, H, I,
rows-per-expert bucket) for the GPU model (shipped in epmoe/tuning/experts_<gpu>.json, or
written by `python -m epmoe.bench.experts --tune`), else a heuristic. The bucket is computed
from M rounded up to a power of two *tokens* (M / top_k), so an eager call and the CUDA graph
of the enclosing power-of-two bucket run the same kernels and give bitwise-equal rows.

`permute_torch` and `reference_experts` (experts/reference.py) are the plain-torch twins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from epmoe.comm.base import Dispatched
from epmoe.config import MoEConfig
from epmoe.experts.base import ExpertRunner, ExpertWeights, register_runner
from epmoe.experts.triton_prepare import prepare_triton
from epmoe.quant import AMAX_EPS, FP8_BLOCK, QuantizedTensor

ACT_CODES = {"silu": 0, "gelu": 1, "swiglu_clamped": 2}
WEIGHT_FORMAT_CODES = {"bf16": 0, "fp8": 1, "fp8_block": 2, "nvfp4": 3}
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
PAIR_MODE_MAX_PAIRS = 16  # default: at most this many pairs -> one program per pair, no sort
# the sort: up to this many pairs one program does everything (one launch); beyond, the pairs are
# split into segments over about SORT_SEGMENTS programs (histogram, scan, scatter: three launches).
# Measured on H200 (E = 128): one program 27 us at 512 pairs and 276 us at 8192, the segmented
# sort 15-18 us up to 8192 pairs and 41 us at 131072; equal at 256
SMALL_SORT_MAX_PAIRS = 256
SORT_SEGMENTS = 256
# w8a8 m tiles: gate_up keeps two [BLOCK_M, 128] fp32 accumulators and a dot result live; at 128
# rows that is ~192 registers a thread with 8 warps (spills), at 64 rows half.
FP8_MAX_BLOCK_M = 64
# nvfp4 in sorted mode: from this many rows per expert (bucketed) on, decode whole experts into a
# scratch buffer once and run the bf16 kernels, instead of decoding each weight tile per m tile
# (the `tl` kernels); with the tensor-core decode kernels (Gluon, bf16 activations) from
# NVFP4_MMA_MAX_RPE on: measured on H200 with 32-row blocks against the scratch, 1.9-2.5x at 32 rows
# per expert (qwen3, mixtral, gpt-oss, deepseek-v3), 1.4x at 64 (qwen3, mixtral)
NVFP4_DEQUANT_MIN_RPE = 32
NVFP4_MMA_MAX_RPE = 128
# nvfp4 on the Gluon decode kernels: pair mode up to this many rows per expert (bucketed); measured
# on H200 at 1 / 0.5 rows per expert (qwen3, deepseek-v3, gpt-oss at 16 tokens): 1.4-2.1x the sort
NVFP4_PAIR_MODE_MAX_RPE = 1
# ... and past pair mode, below NVFP4_MMA_MAX_RPE rows per expert, the sorted blocks run the
# tensor-core decode kernels (kernels/nvfp4_mma.py) with block_m = the bucketed rows per expert up to
# this (each further 8 rows: one more mma per decoded word); measured on H200 against the `tl` sorted
# path with 8-row blocks: 1.6-2.6x at 2-4 rows per expert, 3.5x at 16 (mixtral-8x7b, 64 tokens)
NVFP4_GROUPED_MAX_BM = 32
# pair mode: the tensor-core kernels from this many weights of gate_up touched a launch (pairs x 2I x H)
# on, the CUDA-core Gluon pair kernels below (measured on H200: 0.83x for qwen3 at one token, 25M
# weights; 1.13-1.38x for deepseek-v3 / mixtral at one token and qwen3 from 4 tokens, 100M-235M)
NVFP4_MMA_MIN_WEIGHTS = 1 << 26
DEQUANT_SCRATCH_MB = 1024  # default cap of that scratch (EPMOE_DEQUANT_SCRATCH_MB), one per device and thread


# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one GEMM (block_n counts columns of the output;
    gate_up computes block_n gate and block_n up columns per program)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    tma: bool = False  # weights through the bulk tensor copy engine (GPU, sorted mode only)
    pdl: bool = False  # down only, pair mode, GPU: programmatic dependent launch (see grouped_gemm.py)


@dataclass(frozen=True)
class ExpertsConfig:
    """block_m = 1: pair mode (no sort, matrix-vector products); else the sort's slot alignment
    and the m tile of both GEMMs. dequant (sorted mode, nvfp4 weights): decode whole experts
    once per call into a float scratch buffer and run the float kernels with these tiles,
    instead of decoding every weight tile once per m tile inside the GEMM."""

    block_m: int
    gate_up: GemmConfig
    down: GemmConfig
    dequant: bool = False

    @property
    def pair_mode(self) -> bool:
        return self.block_m == 1

    def to_json(self) -> dict[str, Any]:
        d = {"block_m": self.block_m, "gate_up": asdict(self.gate_up), "down": asdict(self.down)}
        return {**d, "dequant": True} if self.dequant else d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExpertsConfig:
        return cls(d["block_m"], GemmConfig(**d["gate_up"]), GemmConfig(**d["down"]), bool(d.get("dequant", False)))


def _pow2_ceil(x: float) -> float:
    return 2.0 ** math.ceil(math.log2(x)) if x > 0 else 0.0


def bucket_pairs(num_pairs: int, top_k: int) -> int:
    """M rounded up to a power of two tokens (times top_k): the size configs are chosen for."""
    tokens = -(-num_pairs // max(top_k, 1))
    return int(_pow2_ceil(tokens)) * top_k if num_pairs else 0


def config_key(fmt: str, hidden: int, intermediate: int, rows_per_expert: float) -> str:
    """Table key: weight format, gate_up (N=2I, K=H) / down (N=H, K=I) sizes, rows-per-expert bucket."""
    return f"{fmt}|H={hidden}|I={intermediate}|rpe={_pow2_ceil(rows_per_expert):g}"


def tuning_dir() -> Path:
    """Where `--tune` writes tables (EPMOE_TUNING_DIR, default ~/.cache/epmoe); read before the shipped ones."""
    return Path(os.environ.get("EPMOE_TUNING_DIR", Path.home() / ".cache" / "epmoe"))


def table_file_name(device_name: str) -> str:
    return "experts_" + "".join(c if c.isalnum() else "_" for c in device_name.lower()).strip("_") + ".json"


@lru_cache(maxsize=8)
def _load_table(device_name: str) -> dict[str, ExpertsConfig]:
    table: dict[str, ExpertsConfig] = {}
    name = table_file_name(device_name)
    for path in (Path(__file__).parent.parent / "tuning" / name, tuning_dir() / name):  # user file wins
        if path.exists():
            for k, v in json.loads(path.read_text()).get("configs", {}).items():
                table[k] = ExpertsConfig.from_json(v)
    return table


def pair_mode_for(fmt: str, num_pairs: int, num_experts: int, device: torch.device | None = None,
                  decode: str | None = None) -> bool:
    """Whether M (bucketed) pairs run in pair mode: at most PAIR_MODE_MAX_PAIRS, or for nvfp4 on
    the Gluon decode kernels at most NVFP4_PAIR_MODE_MAX_RPE rows per expert (there, decoding a
    touched expert once per pair beats decoding each weight tile once per m tile of the sort).
    decode: the nvfp4 decode choice (TritonOptions.nvfp4_decode; None: from the environment)."""
    if num_pairs <= PAIR_MODE_MAX_PAIRS:
        return True
    return (fmt == "nvfp4" and device is not None and gluon_decode(device, decode)
            and num_pairs / max(num_experts, 1) <= NVFP4_PAIR_MODE_MAX_RPE)


def nvfp4_grouped_for(fmt: str, num_pairs: int, num_experts: int, device: torch.device | None = None,
                      decode: str | None = None) -> bool:
    """Whether M (bucketed) pairs of nvfp4 weights run the sorted tensor-core decode kernels: past
    pair mode and below NVFP4_MMA_MAX_RPE rows per expert, on a GPU that runs Gluon."""
    return (fmt == "nvfp4" and device is not None and not pair_mode_for(fmt, num_pairs, num_experts, device, decode)
            and gluon_decode(device, decode) and num_pairs / max(num_experts, 1) < NVFP4_MMA_MAX_RPE)


def nvfp4_mma_pairs(num_pairs: int, hidden: int, intermediate: int, decode: str | None = None) -> bool:
    """Whether pair-mode nvfp4 (bf16 activations, Gluon) runs the tensor-core decode kernels rather
    than the CUDA-core ones: enough weights touched for the larger tiles to fill the GPU."""
    choice = nvfp4_decode_choice(decode)
    return choice == "mma" or (choice == "gluon" and num_pairs * 2 * intermediate * hidden >= NVFP4_MMA_MIN_WEIGHTS)


def default_config(num_pairs: int, num_experts: int, hidden: int, intermediate: int, fmt: str = "bf16",
                   pair_mode: bool | None = None, grouped: bool = False, decode: str | None = None) -> ExpertsConfig:
    """Heuristic config for M pairs over E local experts (used where no tuned entry exists);
    pair_mode None: M <= PAIR_MODE_MAX_PAIRS. grouped: the sorted nvfp4 tensor-core decode kernels
    (block_m = the bucketed rows per expert, up to NVFP4_GROUPED_MAX_BM)."""
    if grouped:  # the tensor-core decode kernels (measured on H200 over the four presets, 2-16 rows per expert;
        # 32-row blocks take 64-deep tiles: their activation operand holds four times the registers)
        bm = min(NVFP4_GROUPED_MAX_BM, max(2, int(_pow2_ceil(num_pairs / max(num_experts, 1)))))
        bk = 64 if bm > 16 else 128
        return ExpertsConfig(bm, GemmConfig(64, bk, 4, 1), GemmConfig(128, bk, 4, 1))
    if pair_mode if pair_mode is not None else num_pairs <= PAIR_MODE_MAX_PAIRS:
        if fmt == "nvfp4" and nvfp4_mma_pairs(num_pairs, hidden, intermediate, decode):  # tensor-core decode kernels
            # (measured on H200: 32 x 256 gate_up tiles of 2 warps, down 64 x 256 with a prefetch at a
            # few pairs, else 128 x 128)
            down = GemmConfig(64, 256, 4, 2, pdl=True) if num_pairs <= 8 else GemmConfig(128, 128, 4, 1, pdl=True)
            return ExpertsConfig(1, GemmConfig(32, 256, 2, 1), down)
        if fmt == "nvfp4":  # the CUDA-core Gluon decode kernels (measured on H200 over the four presets; a
            # down tile narrowed to 16 rows for more programs at one token was slower for mixtral and gpt-oss)
            up = GemmConfig(16, 256, 4, 1) if num_pairs <= 8 else GemmConfig(16, 128, 2, 1)
            return ExpertsConfig(1, up, GemmConfig(64, 128, 4, 1, pdl=True))
        # few programs: narrow n tiles so that every multiprocessor streams weights
        # (tuned on H200 for qwen3 / mixtral: 16-32 wide tiles of 256-512 k, PDL between the two)
        bn_up = 16 if num_pairs * -(-intermediate // 32) < 512 else 32
        bn_down = 16 if num_pairs * -(-hidden // 32) < 512 else 32
        return ExpertsConfig(1, GemmConfig(bn_up, 256, 4, 1), GemmConfig(bn_down, 256, 4, 1, pdl=True))
    rpe = num_pairs / max(num_experts, 1)
    if rpe <= 24:
        return ExpertsConfig(16, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4))
    if rpe <= 48:
        return ExpertsConfig(32, GemmConfig(64, 128, 4, 4), GemmConfig(64, 128, 4, 4))
    if rpe <= 192:
        return ExpertsConfig(64, GemmConfig(64, 64, 4, 4), GemmConfig(128, 64, 4, 4))
    return ExpertsConfig(128, GemmConfig(64, 64, 8, 4), GemmConfig(128, 64, 8, 4))


def select_config(fmt: str, num_pairs: int, num_experts: int, hidden: int, intermediate: int,
                  top_k: int = 1, device: torch.device | None = None, decode: str | None = None) -> ExpertsConfig:
    """The config for a call: the tuned table of the GPU model if it has the key, else the
    heuristic. nvfp4 from NVFP4_DEQUANT_MIN_RPE rows per expert on (NVFP4_MMA_MAX_RPE where the
    tensor-core decode kernels run): the bf16 config, dequant=True."""
    m = bucket_pairs(num_pairs, top_k)
    pair = pair_mode_for(fmt, m, num_experts, device, decode)
    grouped = nvfp4_grouped_for(fmt, m, num_experts, device, decode)
    if fmt == "nvfp4" and not pair and not grouped and m / max(num_experts, 1) >= NVFP4_DEQUANT_MIN_RPE:
        bf16 = select_config("bf16", num_pairs, num_experts, hidden, intermediate, top_k, device, decode)
        return dataclasses.replace(bf16, dequant=True)
    if device is not None and device.type == "cuda":
        table = _load_table(torch.cuda.get_device_name(device))
        hit = table.get(config_key(fmt, hidden, intermediate, m / max(num_experts, 1)))
        if hit is not None and (hit.block_m == 1) == pair:
            return hit
    return default_config(m, num_experts, hidden, intermediate, fmt, pair, grouped, decode)


# ---------------------------------------------------------------------------------------
# sort
# ---------------------------------------------------------------------------------------


@dataclass
class Permutation:
    """Pairs grouped by expert into block_m-aligned slots (see kernels/permute.py).

    sorted_pair:  [max_blocks * block_m] int32, pair of each slot (slots past expert_end: unset).
    block_expert: [max_blocks] int32, expert of each block of slots, -1 = unused block.
    expert_end:   [E] int32, first padding slot of each expert.
    """

    sorted_pair: torch.Tensor
    block_expert: torch.Tensor
    expert_end: torch.Tensor
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks the sort can need: each expert adds at most one partly filled block."""
    return -(-num_pairs // block_m) + min(num_experts, num_pairs)


def sort_segment(num_pairs: int, sub: int) -> int:
    """Pairs per program of the segmented sort: a power-of-two multiple of the one-hot chunk
    `sub`, small enough for about SORT_SEGMENTS programs (each walks its segment serially)."""
    return min(max(sub, triton_next_pow2(-(-num_pairs // SORT_SEGMENTS))), 2048)


def _e_pad(num_experts: int) -> int:
    return max(16, triton_next_pow2(num_experts))


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def permute(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> Permutation:
    """Sort pairs by expert on the device (no host sync). expert_ids [M] int32, -1 = padding."""
    from epmoe.kernels.permute import (
        moe_align_kernel,
        moe_histogram_kernel,
        moe_permute_small_kernel,
        moe_scatter_kernel,
    )

    M, dev = expert_ids.shape[0], expert_ids.device
    nb = max_blocks(M, num_experts, block_m)
    e_pad = _e_pad(num_experts)
    sub = max(16, min(256, 8192 // e_pad))  # one-hot chunk [sub, e_pad] stays near 8K elements
    sorted_pair = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    expert_end = torch.empty(num_experts, dtype=torch.int32, device=dev)
    NB = 64
    if M <= SMALL_SORT_MAX_PAIRS:
        moe_permute_small_kernel[(1,)](expert_ids, M, num_experts, sorted_pair, block_expert, expert_end, nb,
                                       BLOCK_M=block_m, SUB=sub, E_PAD=e_pad, NB=NB, num_warps=4)
    else:
        seg = sort_segment(M, sub)
        segs = -(-M // seg)
        hist = torch.empty(segs, e_pad, dtype=torch.int32, device=dev)
        seg_base = torch.empty(segs, e_pad, dtype=torch.int32, device=dev)
        bounds = torch.empty(2, e_pad, dtype=torch.int32, device=dev)
        moe_histogram_kernel[(segs,)](expert_ids, M, num_experts, hist, SEG=seg, SUB=sub, E_PAD=e_pad, num_warps=4)
        moe_align_kernel[(1,)](hist, segs, num_experts, seg_base, bounds, expert_end,
                               BLOCK_M=block_m, E_PAD=e_pad, SC=max(1, 16384 // e_pad), num_warps=8)
        moe_scatter_kernel[(segs,)](expert_ids, M, num_experts, seg_base, bounds, sorted_pair, block_expert, nb,
                                    SEG=seg, SUB=sub, E_PAD=e_pad, BLOCK_M=block_m, NB=16, num_warps=4)
    return Permutation(sorted_pair, block_expert, expert_end, block_m)


def permute_grouped(expert_counts: torch.Tensor, expert_offsets: torch.Tensor, num_pairs: int,
                    block_m: int) -> Permutation:
    """The Permutation of pairs already grouped by expert (the pairs of e are [offset[e],
    offset[e] + count[e]), see Dispatched.expert_offsets), from the counts and offsets alone: no
    pass over the pairs. Equal to permute(expert_ids, ...) of those pairs."""
    from epmoe.kernels.permute import moe_grouped_slots_kernel

    E, dev = expert_counts.shape[0], expert_counts.device
    nb = max_blocks(num_pairs, E, block_m)
    sorted_pair = torch.empty(nb * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    expert_end = torch.empty(E, dtype=torch.int32, device=dev)
    if E:
        moe_grouped_slots_kernel[(E,)](expert_counts, expert_offsets, E, sorted_pair, block_expert, expert_end, nb,
                                       BLOCK_M=block_m, E_PAD=_e_pad(E), NB=64, CHUNK=256, num_warps=4)
    else:
        block_expert.fill_(-1)
    return Permutation(sorted_pair, block_expert, expert_end, block_m)


def permute_torch(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> Permutation:
    """Plain-torch twin of `permute` (same buffers; unset slots hold -1)."""
    M, dev = expert_ids.shape[0], expert_ids.device
    nb = max_blocks(M, num_experts, block_m)
    ids = expert_ids.long()
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, -1))
    counts = torch.bincount(ids[ids >= 0], minlength=num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    sorted_pair = torch.full((nb * block_m,), -1, dtype=torch.int32, device=dev)
    block_expert = torch.full((nb,), -1, dtype=torch.int32, device=dev)
    for e in range(num_experts):
        pairs = (ids == e).nonzero().flatten()  # stable: ascending pair order
        s = int(starts[e])
        sorted_pair[s:s + pairs.numel()] = pairs.to(torch.int32)
        block_expert[s // block_m:(s + int(padded[e])) // block_m] = e
    return Permutation(sorted_pair, block_expert, (starts + counts).to(torch.int32), block_m)


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


def _weight_args(w: Any) -> tuple[Any, ...]:
    """(data, stride_e, stride_n, scales, 3 scale strides, global, global stride, format code);
    broadcast (size-1) scale dims get stride 0."""
    if isinstance(w, torch.Tensor):
        return (w, w.stride(0), w.stride(1), w, 0, 0, 0, w, 0, 0)
    sc = w.scales
    st = [0 if sc.shape[d] == 1 else sc.stride(d) for d in range(3)]
    g = w.global_scale if w.global_scale is not None else sc
    sg = 0 if w.global_scale is None or g.shape[0] == 1 else g.stride(0)
    return (w.data, w.data.stride(0), w.data.stride(1), sc, *st, g, sg, WEIGHT_FORMAT_CODES[w.format])


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
    from epmoe.quant import quantize_fp8_groups_triton

    if isinstance(hidden, QuantizedTensor) and hidden.format == "fp8_block" and hidden.block[-1] == FP8_BLOCK:
        q = hidden
    elif isinstance(hidden, QuantizedTensor) and hidden.format == "fp8" and hidden.scales.shape[-1] == 1:
        sc = hidden.scales.reshape(-1, 1)
        return hidden.data.view(torch.float8_e4m3fn), sc, 0 if sc.shape[0] == 1 else sc.stride(0), 0
    else:
        x = hidden.dequantize(torch.float32) if isinstance(hidden, QuantizedTensor) else hidden
        q = quantize_fp8_groups_triton(x.contiguous())
    return q.data.view(torch.float8_e4m3fn), q.scales, q.scales.stride(0), q.scales.stride(1)


def triton_experts(
    hidden: torch.Tensor | QuantizedTensor,
    row_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: ExpertWeights,
    cfg: MoEConfig,
    out: torch.Tensor | None = None,
    config: ExpertsConfig | None = None,
    expert_counts: torch.Tensor | None = None,
    expert_offsets: torch.Tensor | None = None,
    options: TritonOptions | None = None,
) -> torch.Tensor:
    """hidden [N, H] (bf16/fp16/fp32, or a quantized payload), row_ids / expert_ids [M] int32
    (-1 = padding) -> out [M, H] in `out_dtype_for(hidden, weights)`.

    Same contract as `reference_experts` (with `act_quant=activation_quant(...)`); padding rows
    of `out` are left as they were. expert_counts and expert_offsets ([E] int32, both or
    neither): the pairs are grouped by expert as Dispatched.expert_offsets describes (checked
    there, trusted here), and the device sort is skipped. options None: `TritonOptions()`
    (its defaults from the environment).
    """
    from epmoe.kernels.grouped_gemm import moe_down_kernel, moe_gate_up_kernel

    _check(hidden, row_ids, expert_ids, weights, cfg, out)
    options = TritonOptions() if options is None else options
    decode, scratch_mb = options.nvfp4_decode, options.dequant_scratch_mb
    E, H, I, M = weights.w13.shape[0], cfg.hidden, cfg.intermediate, expert_ids.shape[0]
    grouped = expert_offsets is not None
    if grouped != (expert_counts is not None):
        raise ValueError("pass expert_counts and expert_offsets together (the grouped layout), or neither")
    for name, t in (("expert_counts", expert_counts), ("expert_offsets", expert_offsets)):
        if grouped and (t.dtype != torch.int32 or tuple(t.shape) != (E,) or t.device != expert_ids.device):
            raise ValueError(f"{name} must be an int32 [{E}] tensor on {expert_ids.device}")
    dtype = out_dtype_for(hidden, weights)
    if out is None:
        out = torch.empty(M, H, dtype=dtype, device=expert_ids.device)
    if M == 0:
        return out
    if config is None:
        config = select_config(weights.format, M, E, H, I, cfg.top_k, expert_ids.device, decode)
    a_fp8 = activation_quant(weights.format, config) is not None
    if a_fp8 and config.block_m > FP8_MAX_BLOCK_M:
        config = dataclasses.replace(config, block_m=FP8_MAX_BLOCK_M)
    if a_fp8:
        x, xs, stride_xsm, stride_xsg = _fp8_rows(hidden)
    else:
        x = hidden.dequantize(dtype) if isinstance(hidden, QuantizedTensor) else hidden
        xs, stride_xsm, stride_xsg = x, 0, 0
    gluon = _gluon_nvfp4(weights, out.device, decode)
    mma = gluon and x.dtype == torch.bfloat16  # the tensor-core decode kernels multiply bf16
    route = (_nvfp4_sorted_kernels(config, mma)
             if weights.format == "nvfp4" and not config.pair_mode and not config.dequant else "")
    few_rows = route == "mma"
    if route == "tl-default":
        config = default_config(bucket_pairs(M, cfg.top_k), E, H, I, "nvfp4", pair_mode=False, decode=decode)
    bm = config.block_m
    if config.pair_mode:
        num_m = slots = M
        sorted_pair = block_expert = expert_end = expert_ids  # not read in pair mode
    else:
        perm = permute_grouped(expert_counts, expert_offsets, M, bm) if grouped else permute(expert_ids, E, bm)
        num_m = perm.max_blocks
        slots = num_m * bm
        sorted_pair, block_expert, expert_end = perm.sorted_pair, perm.block_expert, perm.expert_end
    if a_fp8:  # e4m3 activations with one fp32 scale per slot and 128 values
        act = torch.empty(slots, I, dtype=torch.float8_e4m3fn, device=out.device)
        act_s = torch.empty(slots, triton_cdiv(I, FP8_BLOCK), dtype=torch.float32, device=out.device)
    else:
        act = act_s = torch.empty(slots, I, dtype=dtype, device=out.device)
    mma_pairs = (config.pair_mode and nvfp4_mma_pairs(bucket_pairs(M, cfg.top_k), H, I, decode)
                 and (decode == "mma" or _mma_ok(config.gate_up) and _mma_ok(config.down)))
    if mma and (few_rows or mma_pairs):
        _nvfp4_mma(x, row_ids, expert_ids, sorted_pair, block_expert, expert_end, num_m, weights, cfg, act, out,
                   config.gate_up, config.down, config.pair_mode, bm, config.down.pdl and config.pair_mode)
        return out
    has_bias = weights.b13 is not None
    b13 = weights.b13 if has_bias else out
    b2 = weights.b2 if has_bias else out
    prec = "ieee" if dtype == torch.float32 else "tf32"
    dequant = config.dequant and not config.pair_mode  # acts on nvfp4 weights (see _weight_chunks)
    g, d = _quantized_tiles(config, 0 if dequant and weights.format == "nvfp4"
                            else WEIGHT_FORMAT_CODES.get(weights.format, 0))
    pdl = d.pdl and config.pair_mode and out.is_cuda
    if gluon and config.pair_mode:
        _nvfp4_decode(x, row_ids, expert_ids, weights, cfg, act, out, g, d, pdl)
        return out
    chunks13 = _weight_chunks(weights.w13, dequant, dtype, scratch_mb)
    for (w13, sw13_e, sw13_n, *q13, f13), e_lo, e_hi, decoded in chunks13:
        g_tma = g.tma and not config.pair_mode and f13 in (0, 1, 2) and _tma_ok(w13)
        moe_gate_up_kernel[(num_m * triton_cdiv(I, g.block_n),)](
            x, x.stride(0), xs, stride_xsm, stride_xsg, w13, sw13_e, sw13_n,
            _descriptor(w13, g) if g_tma else w13, *q13, b13, b13.stride(0) if has_bias else 0,
            act, act.stride(0), act_s, act_s.stride(0), row_ids, expert_ids, sorted_pair, block_expert, expert_end,
            num_m, E, e_lo, e_hi, I, H, float(cfg.swiglu_limit), float(cfg.swiglu_alpha), AMAX_EPS,
            ACT=ACT_CODES[cfg.activation], HAS_BIAS=has_bias, PAIR_MODE=config.pair_mode, DOT_PREC=prec,
            W_TMA=g_tma, USE_PDL=pdl, W_FMT=f13, A_FP8=a_fp8, W_UNIFORM=I % FP8_BLOCK == 0,
            FAST_E2M1=out.is_cuda, W_GLOBAL=decoded,
            BLOCK_M=bm, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m,
            num_warps=g.num_warps, num_stages=g.num_stages,
        )
    for (w2, sw2_e, sw2_n, *q2, f2), e_lo, e_hi, decoded in _weight_chunks(weights.w2, dequant, dtype, scratch_mb):
        d_tma = d.tma and not config.pair_mode and f2 in (0, 1, 2) and _tma_ok(w2)
        moe_down_kernel[(num_m * triton_cdiv(H, d.block_n),)](
            act, act.stride(0), act_s, act_s.stride(0), w2, sw2_e, sw2_n,
            _descriptor(w2, d) if d_tma else w2, *q2, b2, b2.stride(0) if has_bias else 0,
            out, out.stride(0), expert_ids, sorted_pair, block_expert, expert_end,
            num_m, E, e_lo, e_hi, H, I,
            HAS_BIAS=has_bias, PAIR_MODE=config.pair_mode, DOT_PREC=prec, W_TMA=d_tma, USE_PDL=pdl, W_FMT=f2,
            A_FP8=a_fp8, W_UNIFORM=FP8_BLOCK % d.block_n == 0, FAST_E2M1=out.is_cuda, W_GLOBAL=decoded,
            BLOCK_M=bm, BLOCK_N=d.block_n, BLOCK_K=d.block_k, GROUP_M=d.group_m,
            num_warps=d.num_warps, num_stages=d.num_stages, **({"launch_pdl": True} if pdl else {}),
        )
    return out


NVFP4_DECODE_CHOICES = ("gluon", "mma", "fma", "tl")


def nvfp4_decode_choice(decode: str | None = None, name: str = "nvfp4_decode") -> str:
    """`decode` checked against NVFP4_DECODE_CHOICES (None: EPMOE_NVFP4_DECODE, default "gluon")."""
    if decode is None:
        decode, name = os.environ.get("EPMOE_NVFP4_DECODE", "gluon"), "EPMOE_NVFP4_DECODE"
    if decode not in NVFP4_DECODE_CHOICES:
        raise ValueError(f"{name} must be one of {', '.join(NVFP4_DECODE_CHOICES)}, got {decode!r}")
    return decode


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
    Invalid values raise ValueError naming the variable (or field) and the valid values.
    """

    nvfp4_decode: str = field(default_factory=nvfp4_decode_choice)
    dequant_scratch_mb: float = field(default_factory=_env_scratch_mb)

    def __post_init__(self) -> None:
        nvfp4_decode_choice(self.nvfp4_decode)
        object.__setattr__(self, "dequant_scratch_mb", dequant_scratch_mb(self.dequant_scratch_mb))


def gluon_decode(device: torch.device, decode: str | None = None) -> bool:
    """Whether nvfp4 decode (pair mode, and sorted blocks of up to 32 rows) runs the Gluon kernels: on
    Hopper and newer GPUs. EPMOE_NVFP4_DECODE picks among them: "gluon" (default) the tensor-core
    kernels (kernels/nvfp4_mma.py) wherever they pay (see nvfp4_mma_pairs) and the CUDA-core pair
    kernels (kernels/nvfp4_decode.py) elsewhere, "mma" / "fma" one of the two in pair mode always,
    "tl" the `tl` kernels of grouped_gemm.py (the only ones on the CPU interpreter and older GPUs,
    for stacks whose rows are not 4-byte aligned, and for fp16 / fp32 activations in sorted blocks)."""
    return nvfp4_decode_choice(decode) != "tl" and device.type == "cuda" and _gluon_capable(device.index or 0)


@lru_cache(maxsize=None)
def _gluon_capable(index: int) -> bool:
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    try:
        import epmoe.kernels.nvfp4_decode  # noqa: F401  (Triton builds without Gluon lack it)
    except ImportError:
        return False
    return True


def _decode_tile(c: GemmConfig) -> dict[str, Any]:
    """Launch parameters of a CUDA-core Gluon nvfp4 kernel for a tile: TG threads of a warp along
    the tile's 16-value blocks, the rest along its rows; num_stages > 1 loads one k step ahead."""
    if c.block_k < 16 or c.block_k & (c.block_k - 1) or c.block_n & (c.block_n - 1):
        raise ValueError(f"nvfp4 decode tiles need power-of-two sizes and block_k >= 16, got {c}")
    return {"BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "TG": min(32, c.block_k // 16), "num_warps": c.num_warps,
            "PREFETCH": c.num_stages > 1}


def _words_ok(w: torch.Tensor) -> bool:
    """Whether a uint8 [E, N, K/2] stack reads as 32-bit words: 4-byte aligned base and strides."""
    return w.data_ptr() % 4 == 0 and w.shape[-1] % 4 == 0 and all(st % 4 == 0 for st in w.stride()[:-1])


def _gluon_nvfp4(weights: ExpertWeights, device: torch.device, decode: str) -> bool:
    """Whether these weights run the Gluon nvfp4 kernels on `device`: 32-bit words, block scales
    contiguous along k."""
    return (weights.format == "nvfp4" and gluon_decode(device, decode)
            and all(_words_ok(w.data) and w.scales.stride(-1) == 1 for w in (weights.w13, weights.w2)))


def _word_args(weights: ExpertWeights) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Kernel arguments of the nvfp4 stacks for the Gluon kernels, per stack: the data as 32-bit
    words of eight values (strides in words), scales and their strides, global scale and its
    stride, bias and its row stride (the global scale and 0 without biases)."""
    def one(w: Any, b: torch.Tensor | None) -> tuple[Any, ...]:
        data, se, sn, sc, sse, ssn, ssk, g, sg, _ = _weight_args(w)
        return (data.view(torch.int32), se // 4, sn // 4, sc, sse, ssn, ssk, g, sg,
                g if b is None else b, 0 if b is None else b.stride(0))

    return one(weights.w13, weights.b13), one(weights.w2, weights.b2)


def _nvfp4_decode(x: torch.Tensor, row_ids: torch.Tensor, expert_ids: torch.Tensor, weights: ExpertWeights,
                  cfg: MoEConfig, act: torch.Tensor, out: torch.Tensor, g: GemmConfig, d: GemmConfig,
                  pdl: bool) -> None:
    """Pair-mode nvfp4 through the Gluon kernels: act [M, I] then out [M, H], both in pair order."""
    from epmoe.kernels.nvfp4_decode import nvfp4_decode_down_kernel, nvfp4_decode_gate_up_kernel

    E, H, I, M = weights.w13.shape[0], cfg.hidden, cfg.intermediate, expert_ids.shape[0]
    (w13, se13, sn13, s13, sse13, ssn13, ssk13, g13, sg13, b13, sb13), \
        (w2, se2, sn2, s2, sse2, ssn2, ssk2, g2, sg2, b2, sb2) = _word_args(weights)
    has_bias = weights.b13 is not None
    nvfp4_decode_gate_up_kernel[(M * triton_cdiv(I, g.block_n),)](
        x, x.stride(0), row_ids, expert_ids, w13, se13, sn13, s13, sse13, ssn13, ssk13, g13, sg13,
        b13, sb13, act, act.stride(0), E, I, H,
        float(cfg.swiglu_limit), float(cfg.swiglu_alpha),
        ACT=ACT_CODES[cfg.activation], HAS_BIAS=has_bias, USE_PDL=pdl, **_decode_tile(g))
    nvfp4_decode_down_kernel[(M * triton_cdiv(H, d.block_n),)](
        act, act.stride(0), expert_ids, w2, se2, sn2, s2, sse2, ssn2, ssk2, g2, sg2,
        b2, sb2, out, out.stride(0), E, H, I,
        HAS_BIAS=has_bias, USE_PDL=pdl, **_decode_tile(d), **({"launch_pdl": True} if pdl else {}))


def _nvfp4_sorted_kernels(config: ExpertsConfig, mma: bool) -> str:
    """The kernels of a sorted nvfp4 call without the scratch: "mma" (the tensor-core kernels, when
    they run here: blocks of up to NVFP4_GROUPED_MAX_BM rows whose tiles they take, and blocks under
    16 rows always, where a bad tile is an error), "tl" (this config on the `tl` kernels), or
    "tl-default" (blocks under 16 rows without them: `tl` dots need 16 rows, so its heuristic config)."""
    if mma and config.block_m <= NVFP4_GROUPED_MAX_BM and (
            config.block_m < 16 or _mma_ok(config.gate_up) and _mma_ok(config.down)):
        return "mma"
    return "tl-default" if config.block_m < 16 else "tl"


def _mma_ok(c: GemmConfig) -> bool:
    """Whether the tensor-core nvfp4 kernels take this tile: block_n a power of two and a multiple
    of 16 rows per warp, block_k a power of two of at least 64 values."""
    return not (c.block_n & (c.block_n - 1) or c.block_n % (16 * c.num_warps) or c.block_k < 64
                or c.block_k & (c.block_k - 1))


def _mma_tile(c: GemmConfig, K: int) -> GemmConfig:
    """The tile the tensor-core nvfp4 kernels run for reduction length K: block_k halved while that
    makes it divide K (so the k loop runs without masks)."""
    if not _mma_ok(c):
        raise ValueError(f"nvfp4 tensor-core tiles need block_n a power-of-two multiple of 16 x num_warps and "
                         f"block_k a power of two >= 64, got {c}")
    bk = c.block_k
    while bk > 64 and K % bk:
        bk //= 2
    return dataclasses.replace(c, block_k=bk if K % bk == 0 else c.block_k)


def _nvfp4_mma(x: torch.Tensor, row_ids: torch.Tensor, expert_ids: torch.Tensor, sorted_pair: torch.Tensor,
               block_expert: torch.Tensor, expert_end: torch.Tensor, num_m: int, weights: ExpertWeights,
               cfg: MoEConfig, act: torch.Tensor, out: torch.Tensor, g: GemmConfig, d: GemmConfig,
               pair_mode: bool, block_m: int, pdl: bool) -> None:
    """nvfp4 through the tensor-core decode kernels (kernels/nvfp4_mma.py): pair mode (act in pair
    order) or sorted blocks of block_m <= NVFP4_GROUPED_MAX_BM slots (act in slot order); out [M, H]
    in pair order."""
    from epmoe.kernels.nvfp4_mma import nvfp4_mma_down_kernel, nvfp4_mma_gate_up_kernel

    E, H, I = weights.w13.shape[0], cfg.hidden, cfg.intermediate
    (w13, se13, sn13, s13, sse13, ssn13, ssk13, g13, sg13, b13, sb13), \
        (w2, se2, sn2, s2, sse2, ssn2, ssk2, g2, sg2, b2, sb2) = _word_args(weights)
    has_bias = weights.b13 is not None
    g, d = _mma_tile(g, H), _mma_tile(d, I)
    common = {"PAIR_MODE": pair_mode, "USE_PDL": pdl, "BLOCK_M": block_m}
    nvfp4_mma_gate_up_kernel[(num_m * triton_cdiv(I, g.block_n),)](
        x, x.stride(0), row_ids, expert_ids, sorted_pair, block_expert, expert_end,
        w13, se13, sn13, s13.view(torch.uint8), sse13, ssn13, ssk13, g13, sg13, b13, sb13, act, act.stride(0),
        E, I, H, float(cfg.swiglu_limit), float(cfg.swiglu_alpha),
        ACT=ACT_CODES[cfg.activation], HAS_BIAS=has_bias, EVEN_K=H % g.block_k == 0, **common,
        PREFETCH=g.num_stages > 1, BLOCK_N=g.block_n, BLOCK_K=g.block_k, num_warps=g.num_warps)
    nvfp4_mma_down_kernel[(num_m * triton_cdiv(H, d.block_n),)](
        act, act.stride(0), expert_ids, sorted_pair, block_expert, expert_end,
        w2, se2, sn2, s2.view(torch.uint8), sse2, ssn2, ssk2, g2, sg2, b2, sb2, out, out.stride(0), E, H, I,
        HAS_BIAS=has_bias, EVEN_K=I % d.block_k == 0, **common,
        PREFETCH=d.num_stages > 1, BLOCK_N=d.block_n, BLOCK_K=d.block_k, num_warps=d.num_warps,
        **({"launch_pdl": True} if pdl else {}))


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


def scratch_experts(num_experts: int, n: int, k: int, dtype: torch.dtype, scratch_mb: float | None = None) -> int:
    """Experts per chunk of the dequantization scratch: as many [n, k] experts as fit in
    scratch_mb megabytes (None: TritonOptions' default, EPMOE_DEQUANT_SCRATCH_MB or
    DEQUANT_SCRATCH_MB), at least one."""
    cap = (_env_scratch_mb() if scratch_mb is None else scratch_mb) * 2**20
    per_expert = n * k * dtype.itemsize
    return max(1, min(num_experts, int(cap // per_expert)))


def _weight_chunks(w: Any, dequant: bool, dtype: torch.dtype, scratch_mb: float) -> Any:
    """(kernel weight args, e_lo, e_hi, decoded) per launch of a GEMM: the weights as they are,
    once; or (dequant, nvfp4 weights) chunks of experts decoded into this thread's scratch, each
    right before its launch (the scratch is reused chunk after chunk, stream-ordered)."""
    from epmoe.kernels.grouped_gemm import nvfp4_dequant_kernel

    E = w.shape[0]
    if not (dequant and isinstance(w, QuantizedTensor) and w.format == "nvfp4"):
        yield _weight_args(w), 0, E, False
        return
    _, N, K = w.shape
    chunk = scratch_experts(E, N, K, dtype, scratch_mb)
    buf = dequant_scratch(w.data.device, dtype, chunk * N * K)
    _, se, sn, sc, ss_e, ss_n, ss_k, gl, sg, _ = _weight_args(w)
    bn, bk = 32, 512  # measured on H200: 3.96 TB/s of bytes read + written (32 x 256: 3.5)
    for e_lo in range(0, E, chunk):
        e_hi = min(E, e_lo + chunk)
        view = buf[:(e_hi - e_lo) * N * K].view(e_hi - e_lo, N, K)
        nvfp4_dequant_kernel[(triton_cdiv(N, bn) * triton_cdiv(K, bk), e_hi - e_lo)](
            w.data, se, sn, sc, ss_e, ss_n, ss_k, view, view.stride(0), view.stride(1), e_lo, N, K,
            FAST_E2M1=view.is_cuda, BLOCK_N=bn, BLOCK_K=bk, num_warps=8)
        yield (view, view.stride(0), view.stride(1), sc, 0, 0, 0, gl, sg, 0), e_lo, e_hi, True


def _quantized_tiles(config: ExpertsConfig, fmt_code: int) -> tuple[GemmConfig, GemmConfig]:
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


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@register_runner
class TritonRunner(ExpertRunner):
    """Grouped-GEMM runner in Triton; capturable in CUDA graphs (no host sync)."""

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

    def __call__(self, d: Dispatched, out: torch.Tensor | None = None) -> torch.Tensor:
        hidden, w = d.hidden, self.weights
        if isinstance(hidden, torch.Tensor) and isinstance(w.w13, torch.Tensor) and w.w13.dtype != hidden.dtype:
            raise ValueError(f"hidden is {hidden.dtype} but the weights are {w.w13.dtype}; build the layer "
                             f"with weights in the activation dtype")
        return triton_experts(hidden, d.row_ids.contiguous(), d.expert_ids.contiguous(), w, self.cfg, out,
                              expert_counts=None if d.expert_offsets is None else d.expert_counts.contiguous(),
                              expert_offsets=d.expert_offsets, options=self.options)
