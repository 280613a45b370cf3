"""How the triton runner picks its kernels and tiles for a call: configs, tuned tables, mode predicates.

    select_config(fmt, M, E, H, I, top_k, device)  -> ExpertsConfig
        the tuned table of the GPU model if it has the key, else `default_config` (a heuristic)

A table is keyed by (weight format, H, I, rows-per-expert bucket) for one GPU model (shipped in
epmoe/tuning/experts_<gpu>.json, or written by `python -m epmoe.bench.experts --tune` under
`tuning_dir()`, which wins). The bucket comes from M rounded up to a power of two *tokens* (M / top_k),
so an eager call and the CUDA graph of the enclosing bucket run the same kernels (bitwise-equal rows).
The predicates say which kernels a call runs: pair mode (one program per pair, no sort) or the Gluon
nvfp4 decode kernels; `decode` is the runner's nvfp4 decode choice (TritonOptions.nvfp4_decode; None
reads EPMOE_NVFP4_DECODE).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from epmoe.ops.nvfp4 import mma_tile_ok
from epmoe.util import cdiv, next_pow2

PAIR_MODE_MAX_PAIRS = 16  # default: at most this many pairs -> one program per pair, no sort
# nvfp4, sorted mode: from this many rows per expert (bucketed) on, decode whole experts into a scratch buffer
# once and run the bf16 kernels instead of decoding each weight tile per m tile (`tl` kernels); with the Gluon
# tensor-core decode kernels (bf16 activations) from NVFP4_MMA_MAX_RPE on: measured on H200 with 32-row blocks
# against the scratch, 1.9-2.5x at 32 rows per expert (qwen3, mixtral, gpt-oss, deepseek-v3), 1.4x at 64
NVFP4_DEQUANT_MIN_RPE = 32
NVFP4_MMA_MAX_RPE = 128
# nvfp4 on the Gluon decode kernels: pair mode up to this many rows per expert (bucketed); measured on H200
# at 1 / 0.5 rows per expert (qwen3, deepseek-v3, gpt-oss at 16 tokens): 1.4-2.1x the sort
NVFP4_PAIR_MODE_MAX_RPE = 1
# ... then, below NVFP4_MMA_MAX_RPE, sorted blocks on the tensor-core decode kernels (kernels/nvfp4_mma.py),
# block_m = the bucketed rows per expert up to this (each 8 more rows: one more mma per decoded word);
# measured on H200 against `tl` with 8-row blocks: 1.6-2.6x at 2-4 rows per expert, 3.5x at 16 (mixtral, 64 tokens)
NVFP4_GROUPED_MAX_BM = 32
# pair mode: the tensor-core kernels from this many gate_up weights touched per launch (pairs x 2I x H) on,
# else the CUDA-core Gluon pair kernels (measured on H200: 0.83x for qwen3 at one token, 25M weights;
# 1.13-1.38x for deepseek-v3 / mixtral at one token and qwen3 from 4 tokens, 100M-235M)
NVFP4_MMA_MIN_WEIGHTS = 1 << 26
NVFP4_DECODE_CHOICES = ("gluon", "mma", "fma", "tl")


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one GEMM (block_n: output columns; gate_up computes
    block_n gate and block_n up columns per program)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    tma: bool = False  # weights through the bulk tensor copy engine (GPU, sorted mode only)
    pdl: bool = False  # down only, pair mode, GPU: programmatic dependent launch (see grouped_gemm.py)


@dataclass(frozen=True)
class ExpertsConfig:
    """block_m = 1: pair mode (no sort, matrix-vector products); else the sort's slot alignment and
    the m tile of both GEMMs. dequant (sorted mode, nvfp4 weights): decode whole experts once per call
    into a float scratch buffer and run the float kernels, instead of decoding every weight tile per m tile."""

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


def bucket_pairs(num_pairs: int, top_k: int) -> int:
    """M rounded up to a power of two tokens (times top_k): the size configs are chosen for."""
    return next_pow2(cdiv(num_pairs, max(top_k, 1))) * top_k if num_pairs else 0


def config_key(fmt: str, hidden: int, intermediate: int, rows_per_expert: float) -> str:
    """Table key: weight format, gate_up (N=2I, K=H) / down (N=H, K=I) sizes, rows-per-expert bucket
    (the power of two >= it, fractions included: 0.3 -> 0.5; 0 for 0)."""
    rpe = 2.0 ** math.ceil(math.log2(rows_per_expert)) if rows_per_expert > 0 else 0.0
    return f"{fmt}|H={hidden}|I={intermediate}|rpe={rpe:g}"


def tuning_dir() -> Path:
    """Where `--tune` writes tables (EPMOE_TUNING_DIR, default ~/.cache/epmoe); read before the shipped ones."""
    return Path(os.environ.get("EPMOE_TUNING_DIR", Path.home() / ".cache" / "epmoe"))


def table_file_name(device_name: str) -> str:
    """experts_<gpu model>.json, the model name lowercased with other characters as "_"."""
    return "experts_" + "".join(c if c.isalnum() else "_" for c in device_name.lower()).strip("_") + ".json"


@lru_cache(maxsize=8)
def _load_table(device_name: str, user_dir: Path) -> dict[str, ExpertsConfig]:
    """The shipped table of a GPU model, updated by the one in `user_dir` (its entries win)."""
    table: dict[str, ExpertsConfig] = {}
    name = table_file_name(device_name)
    for path in (Path(__file__).parent.parent / "tuning" / name, user_dir / name):
        if path.exists():
            configs = json.loads(path.read_text()).get("configs", {})
            table.update({k: ExpertsConfig.from_json(v) for k, v in configs.items()})
    return table


def nvfp4_decode_choice(decode: str | None = None, name: str = "nvfp4_decode") -> str:
    """`decode` checked against NVFP4_DECODE_CHOICES (None: EPMOE_NVFP4_DECODE, default "gluon")."""
    if decode is None:
        decode, name = os.environ.get("EPMOE_NVFP4_DECODE", "gluon"), "EPMOE_NVFP4_DECODE"
    if decode not in NVFP4_DECODE_CHOICES:
        raise ValueError(f"{name} must be one of {', '.join(NVFP4_DECODE_CHOICES)}, got {decode!r}")
    return decode


def gluon_decode(device: torch.device, decode: str | None = None) -> bool:
    """Whether nvfp4 decode (pair mode, sorted blocks of up to 32 rows) runs the Gluon kernels (Hopper+).
    "gluon": tensor-core kernels (kernels/nvfp4_mma.py) where they pay (nvfp4_mma_pairs), CUDA-core pair
    kernels (kernels/nvfp4_decode.py) elsewhere; "mma" / "fma": one of them in pair mode always; "tl": the
    grouped_gemm.py kernels (the only ones on the CPU interpreter, older GPUs, rows not 4-byte aligned and
    fp16 / fp32 activations in sorted blocks)."""
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


def pair_mode_for(fmt: str, num_pairs: int, num_experts: int, device: torch.device | None = None,
                  decode: str | None = None) -> bool:
    """Whether M (bucketed) pairs run in pair mode: at most PAIR_MODE_MAX_PAIRS, or nvfp4 on the Gluon
    decode kernels at most NVFP4_PAIR_MODE_MAX_RPE rows per expert (decoding a touched expert once per
    pair beats decoding each weight tile once per m tile of the sort)."""
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


def nvfp4_sorted_kernels(config: ExpertsConfig, mma: bool) -> str:
    """The kernels of a sorted nvfp4 call without the scratch: "mma" (the tensor-core kernels, when
    they run here: blocks of up to NVFP4_GROUPED_MAX_BM rows whose tiles they take, and blocks under
    16 rows always, where a bad tile is an error), "tl" (this config on the `tl` kernels), or
    "tl-default" (blocks under 16 rows without them: `tl` dots need 16 rows, so its heuristic config)."""
    if mma and config.block_m <= NVFP4_GROUPED_MAX_BM and (
            config.block_m < 16 or mma_tile_ok(config.gate_up) and mma_tile_ok(config.down)):
        return "mma"
    return "tl-default" if config.block_m < 16 else "tl"


def default_config(num_pairs: int, num_experts: int, hidden: int, intermediate: int, fmt: str = "bf16",
                   pair_mode: bool | None = None, grouped: bool = False, decode: str | None = None) -> ExpertsConfig:
    """Heuristic config for M pairs over E local experts (used where no tuned entry exists);
    pair_mode None: M <= PAIR_MODE_MAX_PAIRS. grouped: the sorted nvfp4 tensor-core decode kernels
    (block_m = the bucketed rows per expert, up to NVFP4_GROUPED_MAX_BM)."""
    if grouped:  # the tensor-core decode kernels (measured on H200 over the four presets, 2-16 rows per expert;
        # 32-row blocks take 64-deep tiles: their activation operand holds four times the registers)
        bm = min(NVFP4_GROUPED_MAX_BM, max(2, next_pow2(num_pairs / max(num_experts, 1))))
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
        bn_up = 16 if num_pairs * cdiv(intermediate, 32) < 512 else 32
        bn_down = 16 if num_pairs * cdiv(hidden, 32) < 512 else 32
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
                  top_k: int = 1, device: torch.device | None = None, decode: str | None = None,
                  table_dir: str | Path | None = None) -> ExpertsConfig:
    """The config for a call: the tuned table of the GPU model if it has the key, else the
    heuristic. nvfp4 from NVFP4_DEQUANT_MIN_RPE rows per expert on (NVFP4_MMA_MAX_RPE where the
    tensor-core decode kernels run): the bf16 config, dequant=True. table_dir: the user tables
    (TritonOptions.tuning_dir; None: `tuning_dir()`)."""
    m = bucket_pairs(num_pairs, top_k)
    pair = pair_mode_for(fmt, m, num_experts, device, decode)
    grouped = nvfp4_grouped_for(fmt, m, num_experts, device, decode)
    if fmt == "nvfp4" and not pair and not grouped and m / max(num_experts, 1) >= NVFP4_DEQUANT_MIN_RPE:
        bf16 = select_config("bf16", num_pairs, num_experts, hidden, intermediate, top_k, device, decode, table_dir)
        return dataclasses.replace(bf16, dequant=True)
    if device is not None and device.type == "cuda":
        table = _load_table(torch.cuda.get_device_name(device), tuning_dir() if table_dir is None else Path(table_dir))
        hit = table.get(config_key(fmt, hidden, intermediate, m / max(num_experts, 1)))
        if hit is not None and (hit.block_m == 1) == pair:
            return hit
    return default_config(m, num_experts, hidden, intermediate, fmt, pair, grouped, decode)
