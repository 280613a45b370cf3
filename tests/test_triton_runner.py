"""Triton expert runner against the reference runner and its plain-torch twins.

CPU: the Triton interpreter on small fp32/fp16 shapes. GPU (marked): bf16 at model-like sizes,
CUDA-graph replay. Every case poisons what the kernels must not touch: padding pairs point at
out-of-range rows, unused hidden rows hold inf, outputs start as NaN.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from epmoe.comm.base import Dispatched
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, get_runner
from epmoe.experts.reference import reference_experts
from epmoe.experts.triton import activation_quant, scratch_experts, triton_experts
from epmoe.experts.tuning import (
    NVFP4_DEQUANT_MIN_RPE,
    ExpertsConfig,
    GemmConfig,
    bucket_pairs,
    config_key,
    default_config,
    gluon_decode,
    select_config,
)
from epmoe.ops.combine import count_experts
from epmoe.ops.permute import SMALL_SORT_MAX_PAIRS, permute, permute_torch
from epmoe.quant import quantize_activations, quantize_fp8_block_torch, quantize_weights

# (the interpreter's scalar-index fix for numpy >= 2.4 is applied in tests/conftest.py)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# max |out - ref| / max |ref| over valid rows. fp32: ieee dots, only summation order differs.
# fp16 / bf16: hidden and weights are exact in the reference too (it upcasts them), the error is
# the activation rounded to 10 / 7 mantissa bits before the down GEMM plus the output rounding.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# w8a8 (fp8 weights, sorted mode) against its twin: the GEMMs sum in another order, so an
# activation close to an e4m3 rounding midpoint can round to the neighbouring value (one step
# is 2^-3 of that element); such flips are rare and average out in the down GEMM.
W8A8_FLIP_TOL = 1e-2
# ... and against the weight-only reference: every hidden and activation value rounded to 3
# mantissa bits (up to 2^-4 relative each), partly averaging out over H and I terms.
W8A8_TOL = 0.1


@dataclass(frozen=True)
class Case:
    name: str
    rows: tuple[int, ...]  # pairs per local expert (len = E)
    hidden: int = 40
    intermediate: int = 24
    activation: str = "silu"
    dtype: torch.dtype = torch.float32
    padding: int = 3  # extra padding pairs (expert -1), interleaved
    config: ExpertsConfig | None = None  # None: what the runner picks
    fmt: str = "bf16"  # weight format; quantized weights are the reference's weights too
    scale: float = 1.0  # hidden rows times this (large: gate/up past the SwiGLU clamp)

    def __str__(self) -> str:
        return self.name


SORTED16 = ExpertsConfig(16, GemmConfig(16, 16, 4, 2), GemmConfig(32, 32, 4, 2))
SORTED32 = ExpertsConfig(32, GemmConfig(32, 32, 4, 2), GemmConfig(16, 16, 4, 2))
PAIRS = ExpertsConfig(1, GemmConfig(16, 32, 4, 1), GemmConfig(32, 16, 4, 1))
PAIRS_PDL = ExpertsConfig(1, GemmConfig(16, 256, 2, 1), GemmConfig(32, 256, 4, 1, pdl=True))
TMA16 = ExpertsConfig(16, GemmConfig(16, 16, 4, 2, tma=True), GemmConfig(32, 32, 4, 2, tma=True))
DEQUANT16 = ExpertsConfig(16, GemmConfig(16, 16, 4, 2), GemmConfig(32, 32, 4, 2), dequant=True)

CPU_CASES = [
    Case("empty", (0, 0, 0), padding=0),
    Case("only-padding", (0, 0, 0), padding=4),
    Case("one-pair", (0, 1, 0)),
    Case("one-pair-sorted", (0, 1, 0), config=SORTED16),
    Case("three-each-pairs", (3, 3, 3, 3), config=PAIRS),
    Case("three-each-sorted", (3, 3, 3, 3), config=SORTED16),
    Case("sixteen-each", (16, 16, 16), config=SORTED16),
    Case("uneven", (0, 5, 17, 1, 0, 33), config=SORTED16),
    Case("skewed-bm32", (40, 1, 0, 2, 0, 0, 0, 7), config=SORTED32),
    Case("all-to-one", (0, 0, 50, 0), config=SORTED16),
    Case("one-expert", (21,), config=SORTED16),
    Case("default-config", (2, 9, 30, 0, 4)),
    Case("gelu", (3, 0, 16, 1), activation="gelu", config=SORTED16),
    Case("gelu-pairs", (1, 0, 2), activation="gelu"),
    Case("swiglu-bias", (3, 0, 16, 1), activation="swiglu_clamped", config=SORTED16),
    Case("swiglu-bias-pairs", (1, 2, 0), activation="swiglu_clamped"),
    Case("odd-sizes", (3, 17), hidden=33, intermediate=19, config=SORTED16),
    Case("hidden-2880", (1, 3), hidden=2880, intermediate=16, config=SORTED16),
    Case("fp16", (3, 0, 16, 1), dtype=torch.float16, config=SORTED16),
    Case("fp16-pairs", (1, 1, 1), dtype=torch.float16),
    Case("fp16-swiglu", (5, 2), activation="swiglu_clamped", dtype=torch.float16, config=SORTED32),
    Case("tma-weights", (3, 0, 17, 1), config=TMA16),
    Case("tma-swiglu", (2, 20), activation="swiglu_clamped", intermediate=20, config=TMA16),
    Case("tma-unaligned-falls-back", (3, 20), hidden=33, intermediate=19, config=TMA16),
    Case("swiglu-clamped-range", (3, 0, 16, 1), activation="swiglu_clamped", scale=12.0, config=SORTED16),
    Case("swiglu-clamped-range-pairs", (1, 2, 0), activation="swiglu_clamped", scale=12.0),
    Case("fp8-pairs", (1, 0, 2), fmt="fp8"),
    Case("fp8-sorted", (3, 0, 17, 1), fmt="fp8", config=SORTED16),
    Case("fp8-gelu-sorted", (0, 16, 1), activation="gelu", fmt="fp8", config=SORTED16),
    Case("fp8-swiglu-sorted", (5, 0, 3), activation="swiglu_clamped", fmt="fp8", scale=6.0, config=SORTED32),
    Case("fp8-swiglu-pairs", (1, 0, 1), activation="swiglu_clamped", fmt="fp8"),
    Case("fp8-skewed", (40, 1, 0, 2, 0, 0, 0, 7), fmt="fp8", config=SORTED32),
    Case("fp8-tma", (3, 0, 17, 1), hidden=256, intermediate=128, fmt="fp8", config=TMA16),
    Case("fp8-fp16", (3, 16), fmt="fp8", dtype=torch.float16, config=SORTED16),
    Case("fp8-block-pairs", (1, 2), fmt="fp8_block"),
    Case("fp8-block-pairs-deep-tiles", (1, 2), hidden=300, intermediate=136, fmt="fp8_block", config=PAIRS_PDL),
    Case("fp8-block-sorted-partial-blocks", (3, 17), hidden=200, intermediate=136, fmt="fp8_block", config=SORTED16),
    Case("fp8-block-2880", (1, 2), hidden=2880, intermediate=16, fmt="fp8_block", config=SORTED16),
    Case("fp8-block-uniform-scales", (3, 17, 0, 2), hidden=256, intermediate=256, fmt="fp8_block",
         config=SORTED16),  # I % 128 == 0: one weight scale per tile and k step
    Case("fp8-block-129-rows", (129, 0, 1), hidden=64, intermediate=160, fmt="fp8_block", config=SORTED32),
    Case("fp8-block-gelu", (3, 5), activation="gelu", fmt="fp8_block", config=SORTED16),
    Case("fp8-block-swiglu", (4, 0, 2), activation="swiglu_clamped", fmt="fp8_block", config=SORTED16),
    Case("fp8-block-all-to-one", (0, 0, 50, 0), fmt="fp8_block", config=SORTED16),
    Case("nvfp4-pairs", (1, 0, 2), hidden=48, intermediate=32, fmt="nvfp4"),
    Case("nvfp4-sorted", (3, 0, 17, 1), hidden=48, intermediate=32, fmt="nvfp4", config=SORTED16),
    Case("nvfp4-gelu-pairs", (1, 1), hidden=64, intermediate=48, activation="gelu", fmt="nvfp4"),
    Case("nvfp4-gelu-sorted", (3, 16), hidden=64, intermediate=48, activation="gelu", fmt="nvfp4",
         config=SORTED16),
    Case("nvfp4-swiglu-fp16", (2, 5), hidden=64, intermediate=32, activation="swiglu_clamped", fmt="nvfp4",
         dtype=torch.float16, config=SORTED16),
    Case("nvfp4-swiglu-pairs", (1, 0, 1), hidden=64, intermediate=32, activation="swiglu_clamped", fmt="nvfp4"),
    Case("nvfp4-skewed-129", (129, 1, 0, 3), hidden=32, intermediate=48, fmt="nvfp4", config=SORTED32),
    Case("nvfp4-fp16-pairs", (1, 2), hidden=64, intermediate=32, fmt="nvfp4", dtype=torch.float16),
    Case("nvfp4-fp16-pairs-partial-tiles", (2, 1, 0), hidden=48, intermediate=80, fmt="nvfp4", dtype=torch.float16,
         config=PAIRS),
    # prefill: whole experts decoded into the shared scratch, then the float kernels
    Case("nvfp4-dequant", (3, 0, 17, 1), hidden=48, intermediate=32, fmt="nvfp4", config=DEQUANT16),
    Case("nvfp4-dequant-swiglu-fp16", (2, 5, 0), hidden=64, intermediate=48, activation="swiglu_clamped",
         fmt="nvfp4", dtype=torch.float16, config=DEQUANT16),
    Case("nvfp4-dequant-partial-tiles", (129, 1, 0, 3), hidden=272, intermediate=48, fmt="nvfp4",
         config=ExpertsConfig(32, GemmConfig(32, 32, 4, 2), GemmConfig(16, 16, 4, 2), dequant=True)),
    Case("pdl-flag-ignored-off-gpu", (1, 2, 0), config=PAIRS_PDL) if not ON_GPU else
    Case("pdl", (1, 2, 0), config=PAIRS_PDL),
]


def make_problem(case: Case, device: str, seed: int = 0):
    """Weights, hidden rows, and a shuffled pair list with poisoned padding."""
    g = torch.Generator().manual_seed(seed)
    E = len(case.rows)
    cfg = MoEConfig(hidden=case.hidden, intermediate=case.intermediate, num_experts=E, top_k=1,
                    activation=case.activation)
    weights = ExpertWeights.random(cfg, E, generator=g)
    if case.fmt == "bf16":
        w13, w2 = weights.w13.to(device, case.dtype), weights.w2.to(device, case.dtype)
    else:
        w13, w2 = (quantize_weights(w, case.fmt).to(device) for w in (weights.w13, weights.w2))
    weights = ExpertWeights(w13, w2, None if weights.b13 is None else weights.b13.to(device),
                            None if weights.b2 is None else weights.b2.to(device))
    experts = torch.cat([torch.full((n,), e, dtype=torch.int32) for e, n in enumerate(case.rows)]
                        + [torch.full((case.padding,), -1, dtype=torch.int32)])
    experts = experts[torch.randperm(experts.numel(), generator=g)]
    M = experts.numel()
    N = max(M // 2, 1) + 2  # rows are shared between pairs (a token sent once, several experts)
    hidden = torch.randn(N, case.hidden, generator=g) * case.scale
    row_ids = torch.randint(0, N - 1, (M,), generator=g, dtype=torch.int32)
    row_ids[experts < 0] = 10**6  # padding pairs point far out of range
    hidden[N - 1] = float("inf")  # a row no pair reads
    return cfg, weights, hidden.to(device, case.dtype), row_ids.to(device), experts.to(device)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def check_case(case: Case, device: str, seed: int = 0) -> None:
    """The runner against its twin (the reference with the runner's activation quantization:
    TOL, plus W8A8_FLIP_TOL where activations are e4m3) and, for w8a8, against the plain
    reference within W8A8_TOL."""
    cfg, weights, hidden, row_ids, experts = make_problem(case, device, seed)
    M = experts.numel()
    E = len(case.rows)
    config = case.config or select_config(weights.format, M, E, cfg.hidden, cfg.intermediate, cfg.top_k,
                                          torch.device(device))
    act_quant = activation_quant(weights.format, config)
    out = torch.full((M, cfg.hidden), float("nan"), dtype=case.dtype, device=device)
    got = triton_experts(hidden, row_ids, experts, weights, cfg, out=out, config=config)
    assert got.data_ptr() == out.data_ptr()
    valid = experts >= 0
    safe_rows = torch.where(valid, row_ids, torch.zeros_like(row_ids))
    twin = reference_experts(hidden.float(), safe_rows, experts, weights, cfg, out_dtype=torch.float32,
                             act_quant=act_quant)
    if valid.any():
        assert torch.isfinite(out[valid]).all(), "a valid row was not written"
        tol = TOL[case.dtype] + (W8A8_FLIP_TOL if act_quant else 0.0)
        err = _rel(out[valid], twin[valid])
        assert err <= tol, f"relative error {err:.2e} > {tol:.0e} against the twin (act_quant={act_quant})"
        if act_quant:
            plain = reference_experts(hidden.float(), safe_rows, experts, weights, cfg, out_dtype=torch.float32)
            err = _rel(out[valid], plain[valid])
            assert err <= W8A8_TOL, f"w8a8 relative error {err:.2e} > {W8A8_TOL} against weight-only"
    assert torch.isnan(out[~valid]).all(), "a padding row was written"


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_triton_experts_match_reference(case):
    check_case(case, DEVICE)


@pytest.mark.parametrize(("E", "M", "block_m"), [(1, 1, 16), (4, 37, 16), (9, 100, 32), (130, 300, 16), (6, 41, 2),
                                               (9, 77, 4), (130, 300, 8),
                                               (5, SMALL_SORT_MAX_PAIRS + 300, 16),
                                               (130, 5000, 16), (3, 20000, 64)])
def test_permute_matches_torch_twin(E, M, block_m):
    g = torch.Generator().manual_seed(E + M)
    ids = torch.randint(-1, E, (M,), generator=g, dtype=torch.int32)
    if E > 1:
        ids[: M // 3] = E - 1  # skew
    ids[0] = E + 5  # out of range: treated as padding
    ids = ids.to(DEVICE)
    got, want = permute(ids, E, block_m), permute_torch(ids, E, block_m)
    assert torch.equal(got.block_expert, want.block_expert)
    assert torch.equal(got.expert_end, want.expert_end)
    used = want.sorted_pair >= 0
    assert torch.equal(got.sorted_pair[used], want.sorted_pair[used])
    counts = count_experts(torch.where(ids < E, ids, torch.full_like(ids, -1)), E)
    assert int(counts.sum()) == int(used.sum())


def test_runner_from_registry_with_dispatched():
    case = Case("runner", (2, 0, 5))
    cfg, weights, hidden, row_ids, experts = make_problem(case, DEVICE, seed=3)
    d = Dispatched(hidden, row_ids.clamp(max=hidden.shape[0] - 1), experts, count_experts(experts, 3))
    runner = get_runner("triton")(cfg, weights)
    got = runner(d)
    ref = get_runner("reference")(cfg, weights)(d)
    valid = experts >= 0
    torch.testing.assert_close(got[valid], ref[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_runner_dequantizes_a_quantized_payload(fmt):
    case = Case("payload", (3, 0, 2), hidden=64, intermediate=32)
    cfg, weights, hidden, row_ids, experts = make_problem(case, DEVICE, seed=5)
    hidden[-1] = 0.0  # the poisoned row would make the payload's per-tensor scale infinite
    q = quantize_activations(hidden, fmt)
    d = Dispatched(q, row_ids.clamp(max=hidden.shape[0] - 1), experts, count_experts(experts, 3))
    got = get_runner("triton")(cfg, weights)(d)
    ref = get_runner("reference")(cfg, weights)(d)
    valid = experts >= 0
    torch.testing.assert_close(got[valid].float(), ref[valid].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("payload", ["fp8", "fp8_block", "nvfp4"])
@pytest.mark.parametrize("fmt", ["fp8", "fp8_block"])
def test_w8a8_reads_quantized_payloads(fmt, payload):
    """fp8 / fp8_block payloads feed the fp8 GEMM as they arrived (no dequantize-requantize);
    an nvfp4 payload is dequantized and quantized per 128 values. The twin sees the same rows."""
    case = Case("payload", (3, 0, 17, 1), hidden=256, intermediate=128, fmt=fmt, config=SORTED16)
    cfg, weights, hidden, row_ids, experts = make_problem(case, DEVICE, seed=7)
    hidden[-1] = 0.0  # no poisoned row: the fp8 payload has one scale for the whole batch
    q = quantize_activations(hidden, payload)
    out = triton_experts(q, row_ids.clamp(max=hidden.shape[0] - 1), experts, weights, cfg, config=SORTED16)
    twin = reference_experts(q, row_ids.clamp(max=hidden.shape[0] - 1), experts, weights, cfg,
                             out_dtype=torch.float32, act_quant="fp8_block")
    valid = experts >= 0
    assert out.dtype == (torch.bfloat16 if ON_GPU else torch.float32)
    assert _rel(out[valid], twin[valid]) <= TOL[out.dtype] + W8A8_FLIP_TOL


def test_quantized_layouts_the_kernels_cannot_read_are_refused():
    case = Case("layout", (2, 1), hidden=256, intermediate=128)
    cfg, weights, hidden, row_ids, experts = make_problem(case, DEVICE)
    w13 = quantize_fp8_block_torch(weights.w13, block=(64, 64))
    with pytest.raises(ValueError, match="requantize"):
        triton_experts(hidden, row_ids, experts, ExpertWeights(w13, quantize_weights(weights.w2, "fp8")), cfg)


def test_config_buckets_follow_power_of_two_tokens():
    assert bucket_pairs(0, 8) == 0
    assert bucket_pairs(8 * 5, 8) == bucket_pairs(8 * 8, 8) == 64
    assert select_config("bf16", 40, 16, 64, 32, top_k=8) == select_config("bf16", 64, 16, 64, 32, top_k=8)
    assert default_config(8, 128, 2048, 768).pair_mode
    assert not default_config(1024, 128, 2048, 768).pair_mode


def test_shipped_tables_hold_configs_the_kernels_take():
    """Every entry of the shipped tuned tables parses under a key config_key writes, and the nvfp4
    sorted entries (2-32-row blocks) hold tiles the tensor-core decode kernels take for their sizes:
    the runner sends such blocks to those kernels, where a bad tile is an error."""
    from epmoe.experts import tuning
    from epmoe.ops.grouped_gemm import WEIGHT_FORMAT_CODES
    from epmoe.ops.nvfp4 import mma_tile

    paths = sorted((Path(tuning.__file__).parent.parent / "tuning").glob("experts_*.json"))
    assert paths
    for path in paths:
        for key, entry in json.loads(path.read_text())["configs"].items():
            c = ExpertsConfig.from_json(entry)
            fmt, h, i, rpe = key.split("|")
            H, I = int(h.removeprefix("H=")), int(i.removeprefix("I="))
            assert config_key(fmt, H, I, float(rpe.removeprefix("rpe="))) == key
            assert fmt in WEIGHT_FORMAT_CODES and c.block_m & (c.block_m - 1) == 0, key
            if fmt == "nvfp4" and 1 < c.block_m <= tuning.NVFP4_GROUPED_MAX_BM:
                assert tuning.nvfp4_sorted_kernels(c, mma=True) == "mma", key
                mma_tile(c.gate_up, H)  # raises for a tile the kernels cannot take
                mma_tile(c.down, I)


def test_nvfp4_prefill_dequantizes_with_the_bf16_config():
    """From NVFP4_DEQUANT_MIN_RPE rows per expert on, nvfp4 runs the bf16 tiles on decoded weights;
    below that (and at decode) it decodes inside the GEMM."""
    E, H, I, k = 16, 2048, 768, 8
    many = NVFP4_DEQUANT_MIN_RPE * E
    got = select_config("nvfp4", many, E, H, I, top_k=k)
    assert got.dequant and got == dataclasses.replace(select_config("bf16", many, E, H, I, top_k=k), dequant=True)
    assert not select_config("nvfp4", many // 4, E, H, I, top_k=k).dequant
    assert not select_config("nvfp4", 8, E, H, I, top_k=k).dequant
    assert ExpertsConfig.from_json(got.to_json()) == got


def test_nvfp4_dequant_in_chunks_of_one_expert(monkeypatch):
    """A scratch cap smaller than one expert: one expert per chunk, one launch pair each."""
    monkeypatch.setenv("EPMOE_DEQUANT_SCRATCH_MB", "0.001")
    assert scratch_experts(4, 96, 48, torch.float32) == 1
    monkeypatch.setenv("EPMOE_DEQUANT_SCRATCH_MB", "lots")
    with pytest.raises(ValueError, match="EPMOE_DEQUANT_SCRATCH_MB='lots' must be a number"):
        scratch_experts(4, 96, 48, torch.float32)
    monkeypatch.setenv("EPMOE_DEQUANT_SCRATCH_MB", "0.001")
    check_case(Case("nvfp4-dequant-chunks", (3, 0, 17, 1), hidden=48, intermediate=32, fmt="nvfp4",
                    config=DEQUANT16), DEVICE)


@pytest.mark.gpu
def test_nvfp4_dequant_chunks_through_tma_gpu(monkeypatch):
    """Scratch chunks read through the bulk-copy descriptor: each chunk's descriptor starts at its
    first expert, so the tile of expert e is at e - e_lo (reading e read the wrong expert or zeros)."""
    monkeypatch.setenv("EPMOE_DEQUANT_SCRATCH_MB", "0.5")  # w13: 4 experts of 256 x 256 bf16 a chunk
    assert scratch_experts(6, 256, 256, torch.bfloat16) == 4
    tma = ExpertsConfig(16, GemmConfig(64, 64, 4, 3, tma=True), GemmConfig(64, 64, 4, 3, tma=True), dequant=True)
    check_case(Case("nvfp4-dequant-tma-chunks", (3, 0, 17, 1, 40, 2), hidden=256, intermediate=128, fmt="nvfp4",
                    dtype=torch.bfloat16, config=tma), "cuda")


@pytest.mark.parametrize("w2_fmt", ["bf16", "fp8"])
def test_mixed_weight_formats_are_refused(w2_fmt):
    """w13 and w2 in different formats would reach kernels that cannot multiply them: a clear error."""
    case = Case("mixed", (3, 0, 17, 1), hidden=48, intermediate=32, fmt="nvfp4", config=DEQUANT16)
    cfg, weights, hidden, row_ids, experts = make_problem(case, DEVICE)
    plain = ExpertWeights.random(cfg, 4, generator=torch.Generator().manual_seed(0)).w2
    w2 = plain.to(DEVICE) if w2_fmt == "bf16" else quantize_weights(plain, "fp8").to(DEVICE)
    with pytest.raises(ValueError, match="quantize them alike"):
        triton_experts(hidden, row_ids, experts, ExpertWeights(weights.w13, w2), cfg, config=DEQUANT16)


def test_dequant_scratch_is_per_thread():
    """Threads (virtual ranks) interleave their launches: each gets its own scratch, reused by
    its later calls and grown when a call needs more."""
    import threading

    from epmoe.ops.grouped_gemm import dequant_scratch

    dev = torch.device(DEVICE)
    mine = dequant_scratch(dev, torch.float32, 64)
    assert dequant_scratch(dev, torch.float32, 32) is mine
    assert dequant_scratch(dev, torch.float32, 128).numel() >= 128
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(dequant_scratch(dev, torch.float32, 64)))
    t.start()
    t.join()
    assert theirs[0].data_ptr() != dequant_scratch(dev, torch.float32, 64).data_ptr()


def test_clear_errors():
    case = Case("errors", (2, 1))
    cfg, weights, hidden, row_ids, experts = make_problem(case, DEVICE)
    with pytest.raises(ValueError, match="cast one to match"):
        triton_experts(hidden.half(), row_ids, experts, weights, cfg)
    with pytest.raises(ValueError, match="int32"):
        triton_experts(hidden, row_ids.long(), experts, weights, cfg)
    with pytest.raises(ValueError, match="out must be"):
        triton_experts(hidden, row_ids, experts, weights, cfg, out=torch.empty(1, cfg.hidden, device=DEVICE))
    with pytest.raises(ValueError, match="w13"):
        triton_experts(hidden, row_ids, experts, ExpertWeights(weights.w13[:, :-1], weights.w2), cfg)


# ------------------------------------------------------------------------------------------
# GPU: bf16 at model-like sizes
# ------------------------------------------------------------------------------------------

GPU_CASES = [
    Case("decode-1", (0, 1) + (0,) * 30, hidden=2048, intermediate=768, dtype=torch.bfloat16),
    Case("decode-3", (3, 0, 1, 2), hidden=4096, intermediate=1536, dtype=torch.bfloat16),
    Case("rpe-16", (16,) * 32, hidden=2048, intermediate=768, dtype=torch.bfloat16),
    Case("rpe-129", (129,) * 8 + (0,) * 4, hidden=2048, intermediate=768, dtype=torch.bfloat16),
    Case("rpe-1024", (1024, 1024, 0, 1024), hidden=4096, intermediate=1536, dtype=torch.bfloat16),
    Case("skewed", (2000, 3, 0, 1, 40, 0, 0, 129), hidden=2048, intermediate=768, dtype=torch.bfloat16),
    Case("gpt-oss-2880", (5, 129, 0, 16), hidden=2880, intermediate=2880, activation="swiglu_clamped",
         dtype=torch.bfloat16),
    Case("gpt-oss-decode", (1, 0, 1, 1), hidden=2880, intermediate=2880, activation="swiglu_clamped",
         dtype=torch.bfloat16),
    Case("gelu-1536", (3, 16, 64), hidden=1536, intermediate=1024, activation="gelu", dtype=torch.bfloat16),
    Case("256-experts", tuple((i * 7) % 5 for i in range(256)), hidden=1024, intermediate=256,
         dtype=torch.bfloat16),
    Case("fp8-decode", (1, 0, 1, 1), hidden=2048, intermediate=768, fmt="fp8", dtype=torch.bfloat16),
    Case("fp8-rpe-129", (129, 16, 0, 200), hidden=2048, intermediate=768, fmt="fp8", dtype=torch.bfloat16),
    Case("fp8-block-2880", (129, 16, 0, 200), hidden=2880, intermediate=768, fmt="fp8_block",
         dtype=torch.bfloat16),
    Case("fp8-block-decode", (1, 0, 2), hidden=7168, intermediate=2048, fmt="fp8_block", dtype=torch.bfloat16),
    Case("nvfp4-decode", (1, 1, 0, 1), hidden=4096, intermediate=1536, fmt="nvfp4", dtype=torch.bfloat16),
    Case("nvfp4-swiglu-2880", (5, 129, 0, 16), hidden=2880, intermediate=2880, activation="swiglu_clamped",
         fmt="nvfp4", dtype=torch.bfloat16),
    Case("fp8-block-rpe-1024", (1024, 0, 1024, 3), hidden=7168, intermediate=2048, fmt="fp8_block",
         dtype=torch.bfloat16),
    Case("fp8-block-swiglu-2880", (5, 129, 0, 16), hidden=2880, intermediate=2880, activation="swiglu_clamped",
         fmt="fp8_block", dtype=torch.bfloat16),
    Case("fp8-gelu-1536", (3, 16, 64), hidden=1536, intermediate=1024, activation="gelu", fmt="fp8",
         dtype=torch.bfloat16),
    Case("fp8-skewed", (2000, 3, 0, 1, 40, 0, 0, 129), hidden=2048, intermediate=768, fmt="fp8",
         dtype=torch.bfloat16),
    Case("nvfp4-rpe-1024", (1024, 1024, 0, 1024), hidden=4096, intermediate=1536, fmt="nvfp4",
         dtype=torch.bfloat16),
    Case("nvfp4-gelu-129", (129, 3, 0, 16), hidden=1536, intermediate=1024, activation="gelu", fmt="nvfp4",
         dtype=torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_triton_experts_bf16_gpu(case):
    check_case(case, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SORTED16, SORTED32, PAIRS, PAIRS_PDL, TMA16,
                                    ExpertsConfig(64, GemmConfig(64, 64, 4, 4), GemmConfig(128, 64, 4, 4)),
                                    ExpertsConfig(128, GemmConfig(64, 64, 8, 4), GemmConfig(128, 64, 8, 4)),
                                    ExpertsConfig(128, GemmConfig(128, 64, 8, 4, tma=True),
                                                  GemmConfig(256, 64, 8, 4, tma=True))],
                         ids=lambda c: f"bm{c.block_m}-tma{int(c.gate_up.tma)}-pdl{int(c.down.pdl)}")
def test_triton_experts_bf16_gpu_configs(config):
    check_case(Case("cfg", (1, 0, 200, 33), hidden=2880, intermediate=768, dtype=torch.bfloat16,
                    config=config), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp8", "fp8_block", "nvfp4"])
@pytest.mark.parametrize("config", [SORTED16, PAIRS_PDL,
                                    ExpertsConfig(64, GemmConfig(64, 64, 4, 4), GemmConfig(128, 64, 4, 4)),
                                    ExpertsConfig(128, GemmConfig(128, 64, 8, 4, tma=True),
                                                  GemmConfig(256, 64, 8, 4, tma=True))],
                         ids=lambda c: f"bm{c.block_m}-tma{int(c.gate_up.tma)}")
def test_triton_experts_quantized_gpu_configs(config, fmt):
    check_case(Case("cfg", (1, 0, 200, 33), hidden=2880, intermediate=768, dtype=torch.bfloat16, fmt=fmt,
                    config=config), "cuda")


# ------------------------------------------------------------------------------------------
# nvfp4 decode (pair mode): the Gluon kernels on Hopper, the `tl` kernels elsewhere
# ------------------------------------------------------------------------------------------

# (GemmConfig block_k is the bf16 tile's; nvfp4 pair mode runs twice as deep: TG = block_k / 8 up to 32)
GLUON_CONFIGS = [
    ExpertsConfig(1, GemmConfig(16, 256, 4, 1), GemmConfig(16, 128, 4, 1, pdl=True)),  # TG 32 / 16, PDL
    ExpertsConfig(1, GemmConfig(8, 128, 2, 3), GemmConfig(32, 32, 4, 3, pdl=True)),  # prefetch, TG 16 / 4
    ExpertsConfig(1, GemmConfig(64, 64, 8, 1), GemmConfig(4, 8, 1, 2)),  # 8 warps; rows < the layout's
]
MMA_CONFIGS = [  # the tensor-core nvfp4 kernels: pair mode, then sorted blocks of 2 to 32 rows
    ExpertsConfig(1, GemmConfig(32, 256, 2, 1), GemmConfig(64, 256, 4, 2, pdl=True)),  # PDL, prefetch
    ExpertsConfig(1, GemmConfig(16, 64, 1, 2), GemmConfig(128, 128, 4, 1)),  # one warp; two 16-row slabs a warp
    ExpertsConfig(2, GemmConfig(64, 128, 4, 1), GemmConfig(128, 128, 4, 1)),
    ExpertsConfig(4, GemmConfig(64, 128, 2, 2), GemmConfig(32, 512, 1, 2)),
    ExpertsConfig(8, GemmConfig(32, 256, 1, 1), GemmConfig(64, 64, 4, 2)),
    ExpertsConfig(16, GemmConfig(64, 128, 4, 1), GemmConfig(128, 128, 4, 2)),  # two mma column groups
    ExpertsConfig(32, GemmConfig(64, 64, 4, 2), GemmConfig(32, 64, 2, 1)),
]
GLUON_CASES = [
    Case("silu-bf16", (1, 0, 2, 1), hidden=2880, intermediate=768, fmt="nvfp4", dtype=torch.bfloat16),
    Case("gelu-fp16", (2, 1), hidden=1536, intermediate=1040, activation="gelu", fmt="nvfp4", dtype=torch.float16),
    Case("swiglu-bias-bf16", (1, 1, 0, 1), hidden=2880, intermediate=2880, activation="swiglu_clamped",
         fmt="nvfp4", dtype=torch.bfloat16, scale=12.0),
    Case("silu-fp32", (1, 2), hidden=112, intermediate=48, fmt="nvfp4"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", GLUON_CONFIGS, ids=lambda c: f"up{c.gate_up.block_n}x{c.gate_up.block_k}"
                         f"-down{c.down.block_n}x{c.down.block_k}")
@pytest.mark.parametrize("case", GLUON_CASES, ids=str)
@pytest.mark.parametrize("kernels", ["fma", "tl"])
def test_nvfp4_decode_kernels_gpu(kernels, case, config, monkeypatch):
    """The CUDA-core pair-mode nvfp4 paths against the reference: partial tiles (hidden 2880 = 5.6
    tiles of 512, intermediate 1040), every activation, bias, clamped SwiGLU past its limit, fp16 / fp32."""
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", kernels)
    if kernels == "fma" and torch.cuda.get_device_capability()[0] >= 9:
        assert gluon_decode(torch.device("cuda")), "a Hopper GPU must run the Gluon decode kernels"
    check_case(dataclasses.replace(case, config=config), "cuda")


MMA_CASES = [
    Case("silu-2880", (1, 0, 2, 1, 5), hidden=2880, intermediate=768, fmt="nvfp4", dtype=torch.bfloat16),
    Case("gelu-partial-tiles", (2, 1, 6), hidden=1536, intermediate=1040, activation="gelu", fmt="nvfp4",
         dtype=torch.bfloat16),
    Case("swiglu-bias-clamped", (1, 1, 0, 1, 9), hidden=2880, intermediate=2880, activation="swiglu_clamped",
         fmt="nvfp4", dtype=torch.bfloat16, scale=12.0),
    Case("skewed", (17, 1, 0, 3, 8, 2), hidden=2048, intermediate=768, fmt="nvfp4", dtype=torch.bfloat16),
    Case("all-to-one", (0, 0, 37, 0), hidden=1024, intermediate=512, fmt="nvfp4", dtype=torch.bfloat16),
    Case("k-under-one-tile", (1, 2), hidden=112, intermediate=48, fmt="nvfp4", dtype=torch.bfloat16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("config", MMA_CONFIGS, ids=lambda c: f"bm{c.block_m}-up{c.gate_up.block_n}x"
                         f"{c.gate_up.block_k}w{c.gate_up.num_warps}-down{c.down.block_n}x{c.down.block_k}"
                         f"w{c.down.num_warps}")
@pytest.mark.parametrize("case", MMA_CASES, ids=str)
def test_nvfp4_mma_kernels_gpu(case, config, monkeypatch):
    """The tensor-core nvfp4 kernels against the reference, in pair mode and in sorted blocks:
    partial row tiles and k tiles (masked), K under one tile, empty experts, all pairs on one
    expert, blocks partly filled, every activation, bias."""
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "mma")
    if torch.cuda.get_device_capability()[0] >= 9:
        assert gluon_decode(torch.device("cuda"))
    check_case(dataclasses.replace(case, config=config), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("config", [MMA_CONFIGS[0], MMA_CONFIGS[3]], ids=["pairs", "bm4"])
def test_nvfp4_mma_decode_is_exact_for_tiny_and_zero_scales_gpu(config, monkeypatch):
    """Block scales that are e4m3 subnormals (bits 1-7) or zero go through the decode's bf16
    exponent placement as bf16 subnormals: the result must still match the reference's exact
    dequantization."""
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "mma")
    case = Case("tiny", (3, 0, 2, 1), hidden=256, intermediate=128, fmt="nvfp4", dtype=torch.bfloat16)
    cfg, weights, hidden, row_ids, experts = make_problem(case, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for w in (weights.w13, weights.w2):  # every block scale k * 2^-9, k = 0..7
        bits = w.scales.view(torch.uint8)
        bits.copy_(torch.randint(0, 8, bits.shape, device="cuda", dtype=torch.uint8, generator=g))
        w.global_scale.fill_(2.0**10)  # weights of order one again
    out = triton_experts(hidden, row_ids, experts, weights, cfg, config=config)
    valid = experts >= 0
    safe_rows = torch.where(valid, row_ids, torch.zeros_like(row_ids))
    ref = reference_experts(hidden.float(), safe_rows, experts, weights, cfg, out_dtype=torch.float32)
    assert _rel(out[valid], ref[valid]) <= TOL[torch.bfloat16]


@pytest.mark.gpu
def test_nvfp4_decode_paths_agree_gpu(monkeypatch):
    """The three decode paths on one qwen3-sized problem: all sum in fp32, only the order differs."""
    case = Case("qwen3", (1, 0, 3, 1, 2, 0, 0, 1), hidden=2048, intermediate=768, fmt="nvfp4",
                dtype=torch.bfloat16)
    cfg, weights, hidden, row_ids, experts = make_problem(case, "cuda")
    got = {}
    for kernels in ("fma", "mma", "tl"):
        monkeypatch.setenv("EPMOE_NVFP4_DECODE", kernels)
        got[kernels] = triton_experts(hidden, row_ids, experts, weights, cfg)
    valid = experts >= 0
    assert _rel(got["fma"][valid], got["tl"][valid].float()) <= 1e-2
    assert _rel(got["mma"][valid], got["tl"][valid].float()) <= 1e-2


def test_nvfp4_decode_choice_is_checked(monkeypatch):
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "fast")
    with pytest.raises(ValueError, match="EPMOE_NVFP4_DECODE must be one of gluon, mma, fma, tl"):
        gluon_decode(torch.device("cpu"))
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "gluon")
    assert not gluon_decode(torch.device("cpu"))


@pytest.mark.parametrize("raw", ["lots", "nan", "inf", "-1", "0"])
def test_triton_options_are_checked(raw, monkeypatch):
    """Options default from the environment once, when built; bad values name the variable or field."""
    from epmoe.experts.triton import TritonOptions

    monkeypatch.setenv("EPMOE_DEQUANT_SCRATCH_MB", raw)
    with pytest.raises(ValueError, match=f"EPMOE_DEQUANT_SCRATCH_MB='{raw}' must be a number of megabytes, finite"):
        TritonOptions()
    with pytest.raises(ValueError, match="dequant_scratch_mb=.* must be a number of megabytes, finite and > 0"):
        TritonOptions(dequant_scratch_mb=float(raw) if raw != "lots" else raw)
    monkeypatch.setenv("EPMOE_DEQUANT_SCRATCH_MB", "2")
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "fma")
    monkeypatch.setenv("EPMOE_TUNING_DIR", "/tmp/tables")
    opts = TritonOptions()
    assert opts == TritonOptions(nvfp4_decode="fma", dequant_scratch_mb=2.0, tuning_dir="/tmp/tables")
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "fast")
    with pytest.raises(ValueError, match="EPMOE_NVFP4_DECODE must be one of"):
        TritonOptions()
    with pytest.raises(ValueError, match="nvfp4_decode must be one of gluon, mma, fma, tl, got 'fast'"):
        TritonOptions(nvfp4_decode="fast", dequant_scratch_mb=1.0)
    cfg = MoEConfig(num_experts=4, top_k=2, hidden=48, intermediate=32)
    weights = ExpertWeights.random(cfg, 4)
    runner = get_runner("triton")(cfg, weights, opts)  # built options: the environment is not read again
    assert runner.options is opts
    with pytest.raises(TypeError, match="takes TritonOptions"):
        get_runner("triton")(cfg, weights, {"nvfp4_decode": "fma"})


def test_nvfp4_pair_mode_reaches_one_row_per_expert_on_the_gluon_kernels(monkeypatch):
    """Pair mode up to 16 pairs for every format; nvfp4 on the Gluon decode kernels up to one
    (bucketed) row per expert (tensor-core tiles from NVFP4_MMA_MIN_WEIGHTS on), then sorted blocks
    of up to 32 rows on the tensor-core kernels below 128 rows per expert."""
    import epmoe.experts.tuning as tuning
    from epmoe.ops.nvfp4 import mma_tile_ok

    cuda = torch.device("cuda", 0)
    assert tuning.pair_mode_for("bf16", 16, 128, cuda) and not tuning.pair_mode_for("bf16", 32, 128, cuda)
    monkeypatch.setattr(tuning, "_gluon_capable", lambda index: False)
    assert not tuning.pair_mode_for("nvfp4", 128, 128, cuda)
    monkeypatch.setattr(tuning, "_gluon_capable", lambda index: True)
    assert tuning.pair_mode_for("nvfp4", 128, 128, cuda) and tuning.pair_mode_for("nvfp4", 128, 256, cuda)
    assert not tuning.pair_mode_for("nvfp4", 256, 128, cuda) and not tuning.pair_mode_for("fp8", 128, 128, cuda)
    assert not tuning.pair_mode_for("nvfp4", 128, 128, torch.device("cpu"))
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "tl")
    assert not tuning.pair_mode_for("nvfp4", 128, 128, cuda)
    monkeypatch.delenv("EPMOE_NVFP4_DECODE")
    assert tuning.nvfp4_grouped_for("nvfp4", 256, 128, cuda) and tuning.nvfp4_grouped_for("nvfp4", 2048, 128, cuda)
    assert not tuning.nvfp4_grouped_for("nvfp4", 128, 128, cuda)  # pair mode
    assert tuning.nvfp4_grouped_for("nvfp4", 8192, 128, cuda)  # 64 rows per expert
    assert not tuning.nvfp4_grouped_for("nvfp4", 16384, 128, cuda)  # 128 rows per expert: the decoded scratch
    assert not tuning.nvfp4_grouped_for("bf16", 256, 128, cuda)
    assert default_config(256, 128, 2048, 768, "nvfp4", pair_mode=False, grouped=True).block_m == 2
    assert default_config(1024, 128, 2048, 768, "nvfp4", pair_mode=False, grouped=True).block_m == 8
    assert default_config(2048, 128, 2048, 768, "nvfp4", pair_mode=False, grouped=True).block_m == 16
    c = default_config(128, 128, 2048, 768, "nvfp4", pair_mode=True)  # 402M weights: the tensor-core kernels
    assert c.pair_mode and c.down.pdl and c.gate_up.block_n == 32 and mma_tile_ok(c.gate_up)
    c = default_config(8, 128, 2048, 768, "nvfp4", pair_mode=True)  # 25M: the CUDA-core kernels
    assert c.pair_mode and c.down.pdl and c.gate_up.block_n == 16
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "mma")
    assert tuning.nvfp4_mma_pairs(8, 2048, 768)
    monkeypatch.setenv("EPMOE_NVFP4_DECODE", "fma")
    assert not tuning.nvfp4_mma_pairs(128, 2048, 768)
    assert default_config(128, 128, 2048, 768, "bf16").block_m > 1


def test_sorted_nvfp4_picks_the_tensor_core_kernels_only_for_their_tiles():
    import epmoe.experts.tuning as tuning

    mma_tiles = default_config(512, 128, 2048, 768, "nvfp4", pair_mode=False, grouped=True)
    assert mma_tiles.block_m == 4 and tuning.nvfp4_sorted_kernels(mma_tiles, mma=True) == "mma"
    assert tuning.nvfp4_sorted_kernels(mma_tiles, mma=False) == "tl-default"  # fp16 rows, older GPUs
    assert tuning.nvfp4_sorted_kernels(SORTED16, mma=True) == "tl"  # 16 rows, `tl` tiles: as given
    assert tuning.nvfp4_sorted_kernels(ExpertsConfig(32, mma_tiles.gate_up, mma_tiles.down), mma=True) == "mma"
    assert tuning.nvfp4_sorted_kernels(ExpertsConfig(64, mma_tiles.gate_up, mma_tiles.down), mma=True) == "tl"
    bad = ExpertsConfig(4, GemmConfig(16, 32, 4, 1), GemmConfig(16, 32, 4, 1))
    assert tuning.nvfp4_sorted_kernels(bad, mma=True) == "mma"  # and mma_tile refuses the tiles


def test_nvfp4_mma_tiles_are_checked():
    from epmoe.ops.nvfp4 import mma_tile

    assert mma_tile(GemmConfig(64, 256, 4, 1), 2880).block_k == 64  # 2880 = 45 x 64: no k masks
    assert mma_tile(GemmConfig(64, 256, 4, 1), 112).block_k == 256  # no power of two divides: masked
    for bad in (GemmConfig(16, 256, 2, 1), GemmConfig(48, 256, 1, 1), GemmConfig(32, 32, 2, 1)):
        with pytest.raises(ValueError, match="tensor-core tiles"):
            mma_tile(bad, 2048)


NVFP4_DECODE_SIG = {"w_ptr": "*i32", "stride_we": "i32", "stride_wn": "i32", "s_ptr": "*fp8e4nv",
                    "stride_se": "i32", "stride_sn": "i32", "stride_sk": "i32", "g_ptr": "*fp32",
                    "stride_ge": "i32", "b_ptr": "*fp32", "stride_be": "i32", "expert_ids_ptr": "*i32",
                    "E": "i32", "K": "i32"}


_BUILD = """
import importlib, json, sys
from epmoe.ops.build import compile_gluon
module, kernel, sig, consts, num_warps, divisible = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
ptx = compile_gluon(fn, sig, consts, num_warps, divisible=tuple(divisible)).asm["ptx"]
print(json.dumps({word: ptx.count(word) for word in ("bar.sync", "ld.shared", "st.shared", "griddepcontrol",
                                                     "ld.global", "prmt.b32", "mma.sync", "ld.global.v4")}))
"""


def _build_counts(module: str, kernel: str, sig: dict, consts: dict, num_warps: int,
                  divisible: tuple[str, ...] = ()) -> dict[str, int]:
    """Build a Gluon kernel for sm_90 in a process without TRITON_INTERPRET; counts of PTX words."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [module, kernel, {**sig, **dict.fromkeys(consts, "constexpr")}, consts, num_warps, list(divisible)]
    run = subprocess.run([sys.executable, "-c", _BUILD, json.dumps(args)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def _kernel_sig(kernel: str, weights_sig: dict) -> tuple[dict, dict]:
    """Signature and constexprs of a Gluon nvfp4 gate_up (clamped SwiGLU with biases) or down kernel."""
    if kernel == "gate_up":
        return ({**weights_sig, "x_ptr": "*bf16", "stride_xm": "i32", "row_ids_ptr": "*i32", "act_ptr": "*bf16",
                 "stride_am": "i32", "I": "i32", "limit": "fp32", "alpha": "fp32"}, {"ACT": 2, "HAS_BIAS": True})
    return ({**weights_sig, "act_ptr": "*bf16", "stride_am": "i32", "out_ptr": "*bf16", "stride_om": "i32", "N": "i32"},
            {"HAS_BIAS": False})


@pytest.mark.parametrize(("kernel", "pdl", "prefetch", "tile"),
                         [("gate_up", False, False, (16, 512, 32, 4)), ("gate_up", True, True, (8, 256, 16, 2)),
                          ("down", True, False, (32, 256, 16, 4)), ("down", False, True, (64, 128, 8, 8))])
def test_nvfp4_decode_kernels_build_for_hopper_without_barriers(kernel, pdl, prefetch, tile):
    """The Gluon kernels cannot run on the CPU; this builds them for sm_90 (in a process without
    TRITON_INTERPRET) and reads the PTX: no CTA barrier and no shared memory (the point of the
    explicit layouts), and the programmatic-dependent-launch instructions exactly when USE_PDL is set."""
    pytest.importorskip("triton.experimental.gluon")
    bn, bk, tg, nw = tile
    sig, consts = _kernel_sig(kernel, NVFP4_DECODE_SIG)
    consts |= {"USE_PDL": pdl, "PREFETCH": prefetch, "BLOCK_N": bn, "BLOCK_K": bk, "TG": tg}
    counts = _build_counts("epmoe.kernels.nvfp4_decode", f"nvfp4_decode_{kernel}_kernel", sig, consts, nw)
    assert counts["bar.sync"] == counts["ld.shared"] == counts["st.shared"] == 0, counts
    assert (counts["griddepcontrol"] > 0) == pdl, counts
    assert counts["ld.global"] > 0 and counts["prmt.b32"] > 0  # the word decode


NVFP4_MMA_SIG = {**NVFP4_DECODE_SIG, "s_ptr": "*u8", "sorted_pair_ptr": "*i32", "block_expert_ptr": "*i32",
                 "expert_end_ptr": "*i32"}


@pytest.mark.parametrize(("kernel", "pair", "pdl", "prefetch", "even_k", "tile"),
                         [("gate_up", True, True, False, True, (32, 256, 8, 2)),
                          ("gate_up", False, False, True, False, (64, 128, 4, 4)),
                          ("down", True, True, True, True, (128, 128, 1, 4)),
                          ("down", False, False, False, True, (32, 512, 8, 1))])
def test_nvfp4_mma_kernels_build_for_hopper_with_wide_loads(kernel, pair, pdl, prefetch, even_k, tile):
    """The tensor-core nvfp4 kernels built for sm_90: the decoded A operand and the reordered B
    operand reach the mma in registers (no CTA barrier, no shared memory), weights and activations
    load 16 bytes a thread (given the 16-divisible strides a launch specializes), PDL exactly
    when USE_PDL is set."""
    pytest.importorskip("triton.experimental.gluon")
    bn, bk, bm, nw = tile
    sig, consts = _kernel_sig(kernel, NVFP4_MMA_SIG)
    consts |= {"PAIR_MODE": pair, "USE_PDL": pdl, "EVEN_K": even_k, "PREFETCH": prefetch, "BLOCK_M": bm,
               "BLOCK_N": bn, "BLOCK_K": bk}
    divisible = tuple(n for n in sig if n.endswith("_ptr") or n in ("stride_xm", "stride_am", "stride_we",
                                                                   "stride_wn", "stride_se", "stride_sn", "K"))
    counts = _build_counts("epmoe.kernels.nvfp4_mma", f"nvfp4_mma_{kernel}_kernel", sig, consts, nw, divisible)
    assert counts["bar.sync"] == counts["ld.shared"] == counts["st.shared"] == 0, counts
    assert (counts["griddepcontrol"] > 0) == pdl, counts
    assert counts["mma.sync"] > 0 and counts["ld.global.v4"] > 0, counts


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "config"), [((7, 0, 130, 2, 40), None), ((1, 0, 2, 1), PAIRS_PDL)],
                         ids=["sorted", "pairs-pdl"])
@pytest.mark.parametrize("fmt", ["bf16", "fp8_block", "nvfp4"])
def test_cuda_graph_replay_is_bitwise_equal_to_eager(rows, config, fmt):
    case = Case("graph", rows, hidden=2048, intermediate=768, dtype=torch.bfloat16, fmt=fmt)
    cfg, weights, hidden, row_ids, experts = make_problem(case, "cuda")
    row_ids = row_ids.clamp(max=hidden.shape[0] - 1)
    eager = triton_experts(hidden, row_ids, experts, weights, cfg, config=config)
    out = torch.full_like(eager, float("nan"))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_experts(hidden, row_ids, experts, weights, cfg, out=out, config=config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_experts(hidden, row_ids, experts, weights, cfg, out=out, config=config)
    perm = torch.randperm(experts.numel(), device="cuda")  # new routing, same shapes
    experts.copy_(experts[perm])
    row_ids.copy_(row_ids[perm])
    out.fill_(float("nan"))
    graph.replay()
    want = triton_experts(hidden, row_ids, experts, weights, cfg, config=config)
    valid = experts >= 0
    assert torch.equal(out[valid], want[valid])
