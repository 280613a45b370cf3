"""`epmoe bench experts`: the whole experts stage (sort, both GEMMs, activation, rows back in pair
order) per runner, weight format and token count, next to its roofline.

    roofline = max(bytes of the touched experts' weights / HBM copy bandwidth,
                   6 * pairs * H * I FLOPs / dense bf16 GEMM rate)      (both measured in the run)

Host-sync-free runners are timed as CUDA-graph replays, the reference runner eagerly; routing
uniform, or `skewed` (expert popularity ~ 1/rank). Method in docs/bench.md.

    python -m epmoe.bench.experts --preset qwen3-30b-a3b --tokens 1,16,128,1024,4096,16384
    python -m epmoe.bench.experts --tune --preset qwen3-30b-a3b --out tuned.json   # retune
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from epmoe.bench.core import bench, device_name, format_table, hbm_copy_gbps, matmul_tflops
from epmoe.bench.plan import WEIGHT_BYTES
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, tuning
from epmoe.experts.activation import activate
from epmoe.experts.reference import reference_experts
from epmoe.experts.triton import triton_experts
from epmoe.experts.tuning import ExpertsConfig, GemmConfig
from epmoe.ops.combine import count_experts
from epmoe.quant import QuantizedTensor, quantize_weights

FORMAT_ALIASES = {"bf16": "bf16", "fp8": "fp8", "fp8-block": "fp8_block", "fp8_block": "fp8_block", "nvfp4": "nvfp4"}
COLUMNS = ("impl", "format", "routing", "tokens", "us", "tflops", "weight_tbps", "roofline_us", "ratio", "vs_bf16")


# --- ceilings and inputs ---


def measure_ceilings(device: torch.device) -> tuple[float, float]:
    """(HBM copy bandwidth in TB/s counting read + write, dense bf16 GEMM rate in TFLOP/s)."""
    return hbm_copy_gbps(device, iters=20) / 1e3, matmul_tflops(device, iters=20)


def random_weights(cfg: MoEConfig, num_experts: int, device: torch.device, seed: int = 0) -> ExpertWeights:
    """bf16 weights drawn on the device (the large presets take tens of GB)."""
    g = torch.Generator(device=device).manual_seed(seed)
    E, H, I = num_experts, cfg.hidden, cfg.intermediate

    def rnd(*shape: int, fan_in: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        t = torch.empty(*shape, device=device, dtype=dtype)
        return t.normal_(0.0, fan_in**-0.5, generator=g)

    w13, w2 = rnd(E, 2 * I, H, fan_in=H), rnd(E, H, I, fan_in=I)
    if not cfg.has_bias:
        return ExpertWeights(w13, w2)
    return ExpertWeights(w13, w2, rnd(E, 2 * I, fan_in=4, dtype=torch.float32),
                         rnd(E, H, fan_in=4, dtype=torch.float32))


def route_tokens(tokens: int, num_experts: int, top_k: int, routing: str, device: torch.device,
                 seed: int = 0) -> torch.Tensor:
    """[tokens, top_k] int32 distinct experts per token: uniform, or skewed (popularity ~ 1/rank)."""
    g = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(tokens, num_experts, device=device, generator=g)
    if routing == "skewed":
        gumbel = -torch.log(-torch.log(scores.clamp_min(1e-20)))
        prior = -torch.log(torch.arange(1, num_experts + 1, device=device, dtype=torch.float32))
        scores = prior[torch.randperm(num_experts, device=device, generator=g)] + gumbel
    elif routing != "uniform":
        raise ValueError(f"unknown routing {routing!r}; choose uniform or skewed")
    return scores.topk(top_k, dim=-1).indices.to(torch.int32)


def quantized_weights(weights: ExpertWeights, fmt: str, chunk: int = 8) -> ExpertWeights:
    """The bf16 weights quantized to `fmt` (epmoe.quant), a few experts at a time to bound memory."""
    def q(t: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor.cat([quantize_weights(t[i:i + chunk], fmt) for i in range(0, t.shape[0], chunk)])

    return ExpertWeights(q(weights.w13), q(weights.w2), weights.b13, weights.b2)


# --- the torch._grouped_mm pipeline (baseline) ---


def grouped_mm_experts(hidden: torch.Tensor, row_ids: torch.Tensor, expert_ids: torch.Tensor,
                       weights: ExpertWeights, cfg: MoEConfig, out: torch.Tensor) -> torch.Tensor:
    """The experts stage with torch ops only (sort, gather, two torch._grouped_mm, scatter); no
    host sync, so it can be captured. Padding pairs are sorted last and their outputs dropped."""
    E = weights.w13.shape[0]
    key = torch.where(expert_ids >= 0, expert_ids, torch.full_like(expert_ids, E))
    order = torch.argsort(key, stable=True)  # [M]
    offs = torch.cumsum(count_experts(expert_ids, E), 0, dtype=torch.int32)  # [E] group ends
    x = hidden[row_ids[order].long()]  # [M, H] (padding rows past the last group are not computed)
    h = torch._grouped_mm(x, weights.w13.transpose(1, 2), offs=offs)  # [M, 2I]
    if weights.b13 is not None:
        h = (h.float() + weights.b13[key[order].clamp(max=E - 1).long()]).to(h.dtype)
    a = activate(h, cfg)  # [M, I]
    y = torch._grouped_mm(a, weights.w2.transpose(1, 2), offs=offs)  # [M, H]
    if weights.b2 is not None:
        y = (y.float() + weights.b2[key[order].clamp(max=E - 1).long()]).to(y.dtype)
    out[order] = y
    return out


# --- benchmark ---


def _row(impl: str, fmt: str, routing: str, tokens: int, us: float, flops: float, wbytes: float,
         ceilings: tuple[float, float]) -> dict[str, Any]:
    roof = max(wbytes / (ceilings[0] * 1e12), flops / (ceilings[1] * 1e12)) * 1e6
    return {"impl": impl, "format": fmt, "routing": routing, "tokens": tokens, "us": us,
            "tflops": flops / (us * 1e-6) / 1e12, "weight_tbps": wbytes / (us * 1e-6) / 1e12,
            "roofline_us": roof, "ratio": us / roof}


def bench_experts(preset: str, tokens: Sequence[int], formats: Sequence[str] = ("bf16",),
                  impls: Sequence[str] = ("triton", "grouped_mm", "reference"),
                  routings: Sequence[str] = ("uniform", "skewed"), iters: int = 20, reference_max_tokens: int = 1024,
                  ceilings: tuple[float, float] | None = None, configs: dict[int, ExpertsConfig] | None = None,
                  rotate: bool = True) -> list[dict[str, Any]]:
    """Rows (impl, format, routing, tokens, us, tflops, weight_tbps, roofline_us, ratio, vs_bf16) for
    one preset with all its experts on this GPU. `configs` pins the triton config per token count.
    rotate=True: one graph replays the stage for several routings in turn, no L2 flush (why: see
    docs/bench.md); rotate=False: one routing, core.bench's L2 flush between replays."""
    if not torch.cuda.is_available():
        raise ValueError("bench experts needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = MoEConfig.from_preset(preset)
    ceilings = ceilings or measure_ceilings(device)
    weights = random_weights(cfg, cfg.num_experts, device)
    rows: list[dict[str, Any]] = []
    for fmt_name in [FORMAT_ALIASES.get(f, f) for f in formats]:
        fmt = FORMAT_ALIASES.get(fmt_name)
        if fmt is None:
            raise ValueError(f"unknown format {fmt_name!r}; choose from {sorted(FORMAT_ALIASES)}")
        w = weights if fmt == "bf16" else quantized_weights(weights, fmt)
        # torch._grouped_mm is the bf16 baseline; the reference dequantizes every call (small T only)
        fmt_impls = list(impls) if fmt == "bf16" else [i for i in impls if i != "grouped_mm"]
        for routing in routings:
            for T in tokens:
                rows += _bench_point(cfg, w, fmt, routing, T, fmt_impls, iters,
                                     reference_max_tokens if fmt == "bf16" else min(16, reference_max_tokens),
                                     ceilings, (configs or {}).get(T), rotate, device)
        del w
    return add_speedup_vs_bf16(rows)


def add_speedup_vs_bf16(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each triton row gains `vs_bf16`: the triton bf16 time at the same routing and tokens over
    its own (>1: faster than bf16), the measure of the quantized-format targets."""
    base = {(r["routing"], r["tokens"]): r["us"] for r in rows if r["impl"] == "triton" and r["format"] == "bf16"}
    for r in rows:
        b = base.get((r["routing"], r["tokens"]))
        if r["impl"] == "triton" and b is not None and r["us"] == r["us"]:
            r["vs_bf16"] = b / r["us"]
    return rows


def _bench_point(cfg: MoEConfig, weights: ExpertWeights, fmt: str, routing: str, T: int, impls: Sequence[str],
                 iters: int, reference_max_tokens: int, ceilings: tuple[float, float],
                 config: ExpertsConfig | None, rotate: bool, device: torch.device) -> list[dict[str, Any]]:
    E, H, I, K = cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.top_k
    per_expert = 3 * H * I * WEIGHT_BYTES[fmt]
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16, generator=g)
    row_ids = torch.arange(T, device=device, dtype=torch.int32).repeat_interleave(K)
    first = route_tokens(T, E, K, routing, device, seed=T).flatten().contiguous()
    touched = int((count_experts(first, E) > 0).sum())
    # enough routings that one replay reads >= 0.5 GB of weights (L2 holds 50-60 MB)
    reps = min(8, max(1, math.ceil(0.5e9 / (touched * per_expert)))) if rotate else 1
    routings = [first] + [route_tokens(T, E, K, routing, device, seed=T + 1000 * r).flatten().contiguous()
                          for r in range(1, reps)]
    wbytes = sum(int((count_experts(e, E) > 0).sum()) for e in routings) * per_expert / reps
    flops = 6.0 * T * K * H * I
    out = torch.empty(T * K, H, device=device, dtype=torch.bfloat16)
    rows = []
    for impl in impls:
        if impl == "triton":
            calls = [partial(triton_experts, x, row_ids, e, weights, cfg, out=out, config=config) for e in routings]
        elif impl == "grouped_mm":
            if not hasattr(torch, "_grouped_mm"):
                continue
            calls = [partial(grouped_mm_experts, x, row_ids, e, weights, cfg, out) for e in routings]
        elif impl == "reference":
            if T > reference_max_tokens:
                continue
            us = bench(partial(reference_experts, x, row_ids, first, weights, cfg), device=device, warmup=1,
                       iters=3, graph=False)
            rows.append(_row(impl, fmt, routing, T, us, flops, touched * per_expert, ceilings))
            continue
        else:
            raise ValueError(f"unknown impl {impl!r}; choose triton, grouped_mm, reference")
        try:
            us = bench(lambda calls=calls: [c() for c in calls], device=device, warmup=2, iters=iters, graph=True,
                       flush_l2=not rotate) / reps
        except Exception as exc:  # e.g. a tile that does not fit this GPU: report it, keep going
            torch.cuda.synchronize()
            rows.append({"impl": impl, "format": fmt, "routing": routing, "tokens": T, "us": float("nan"),
                         "note": f"{type(exc).__name__}: {str(exc)[:120]}"})
            continue
        rows.append(_row(impl, fmt, routing, T, us, flops, wbytes, ceilings))
    return rows


# --- tuning ---

PAIR_CANDIDATES = [GemmConfig(bn, bk, w, s) for bn, bk, w, s in [
    (16, 256, 4, 1), (32, 256, 4, 1), (16, 512, 4, 1), (32, 128, 4, 1), (64, 128, 4, 1), (8, 512, 4, 1),
    (32, 256, 8, 1), (16, 256, 2, 1), (32, 256, 4, 3), (64, 256, 8, 1), (8, 256, 2, 1), (16, 128, 2, 1)]] + [
    GemmConfig(bn, bk, w, s, pdl=True) for bn, bk, w, s in [  # pdl only acts on the down kernel
        (32, 256, 4, 1), (16, 256, 4, 1), (16, 512, 4, 1), (32, 128, 4, 1), (16, 256, 2, 1), (64, 128, 4, 1)]]
MMA_CANDIDATES = [GemmConfig(bn, bk, w, s, pdl=True) for bn, bk, w, s in [  # the tensor-core nvfp4 kernels
    (32, 256, 2, 1), (16, 256, 1, 1), (32, 128, 2, 1), (64, 128, 4, 1), (64, 128, 2, 1), (32, 256, 1, 1),
    (64, 256, 4, 2), (128, 128, 4, 1), (128, 128, 8, 2), (64, 128, 2, 2), (32, 512, 2, 1), (64, 64, 4, 2)]]
GATE_UP_CANDIDATES = [GemmConfig(bn, bk, w, s, tma=bool(t)) for bn, bk, w, s, t in [
    (64, 128, 4, 4, 0), (64, 64, 4, 4, 0), (128, 64, 4, 3, 0), (64, 128, 8, 3, 0), (128, 64, 8, 4, 0),
    (32, 128, 4, 4, 0), (64, 64, 4, 5, 0), (32, 256, 4, 3, 0), (128, 64, 8, 3, 0),
    (128, 64, 8, 4, 1), (64, 64, 4, 4, 1), (128, 64, 8, 3, 1), (64, 128, 8, 3, 1), (32, 128, 4, 4, 1),
    (64, 128, 4, 4, 1)]]
DOWN_CANDIDATES = [GemmConfig(bn, bk, w, s, tma=bool(t)) for bn, bk, w, s, t in [
    (64, 128, 4, 4, 0), (128, 64, 4, 4, 0), (128, 64, 8, 4, 0), (256, 64, 8, 3, 0), (64, 64, 4, 5, 0),
    (128, 128, 8, 3, 0), (32, 128, 4, 4, 0), (64, 256, 4, 3, 0), (256, 64, 8, 4, 0), (128, 128, 4, 3, 0),
    (256, 64, 8, 4, 1), (128, 64, 8, 4, 1), (128, 128, 8, 3, 1), (256, 64, 8, 3, 1), (64, 128, 4, 4, 1),
    (128, 128, 4, 3, 1)]]


# block_m to try (sorted mode) by rows per expert: up to 8 rows [16], to 32 [16, 32], ..., above 512 [128, 64]
BLOCK_M_CANDIDATES = ((8, [16]), (32, [16, 32]), (128, [32, 64]), (512, [64, 128]), (math.inf, [128, 64]))


def tune_experts(preset: str, tokens: Sequence[int], fmt: str = "bf16", budget_s: float = 300.0,
                 iters: int = 10, log: Any = None) -> dict[str, dict[str, Any]]:
    """Coordinate search (block_m, then the gate_up tile, then the down tile) timing the whole
    stage; returns {config_key: config json}. Stops adding keys once `budget_s` is spent."""
    device = torch.device("cuda", torch.cuda.current_device())
    cfg = MoEConfig.from_preset(preset)
    E, H, I, K = cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.top_k
    weights = random_weights(cfg, E, device)
    if fmt != "bf16":  # time the kernels the key selects: quantized weights take other paths
        weights = quantized_weights(weights, fmt)
    deadline = time.perf_counter() + budget_s
    found: dict[str, dict[str, Any]] = {}
    for T in tokens:
        if time.perf_counter() > deadline:
            break
        if tuning.select_config(fmt, T * K, E, H, I, K, device).dequant:
            if log:
                log(f"{preset} T={T}: nvfp4 runs the bf16 tiles on decoded weights here; tune bf16 instead")
            continue
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        row_ids = torch.arange(T, device=device, dtype=torch.int32).repeat_interleave(K)
        M = T * K  # reps as in bench_experts
        reps = min(8, max(1, math.ceil(0.5e9 / (min(M, E) * 3 * H * I * 2))))
        routings = [route_tokens(T, E, K, "uniform", device, seed=T + 1000 * r).flatten().contiguous()
                    for r in range(reps)]
        out = torch.empty(M, H, device=device, dtype=torch.bfloat16)

        def run(c: ExpertsConfig, routings: list = routings, x: torch.Tensor = x, row_ids: torch.Tensor = row_ids,
                out: torch.Tensor = out) -> float:
            calls = [partial(triton_experts, x, row_ids, e, weights, cfg, out=out, config=c) for e in routings]
            return bench(lambda: [c() for c in calls], device=device, warmup=2, iters=iters, graph=True,
                         flush_l2=False) / len(calls)

        def time_config(c: ExpertsConfig, run: Any = run) -> float:
            if time.perf_counter() > deadline:
                return math.inf
            try:
                return run(c)
            except Exception as exc:  # out of shared memory / registers for this tile
                if log:
                    log(f"  skip {c}: {type(exc).__name__}")
                torch.cuda.synchronize()
                return math.inf

        base = tuning.select_config(fmt, M, E, H, I, K, device)
        m = tuning.bucket_pairs(M, K)
        pair = tuning.pair_mode_for(fmt, m, E, device)
        grouped = tuning.nvfp4_grouped_for(fmt, m, E, device)  # block_m fixed by the rows per expert
        mma = grouped or pair and fmt == "nvfp4" and tuning.gluon_decode(device) and tuning.nvfp4_mma_pairs(m, H, I)
        best, best_us = base, run(base)
        bms = [1] if pair else [base.block_m] if grouped else next(b for lim, b in BLOCK_M_CANDIDATES if m / E <= lim)
        for bm in bms:
            cur = ExpertsConfig(bm, best.gate_up, best.down) if bm != best.block_m else best
            cur_us = time_config(cur) if cur is not best else best_us
            for field, sorted_cands in (("gate_up", GATE_UP_CANDIDATES), ("down", DOWN_CANDIDATES)):
                for cand in MMA_CANDIDATES if mma else PAIR_CANDIDATES if pair else sorted_cands:
                    trial = ExpertsConfig(bm, cand, cur.down) if field == "gate_up" else ExpertsConfig(
                        bm, cur.gate_up, cand)
                    us = time_config(trial)
                    if us < cur_us:
                        cur, cur_us = trial, us
            if cur_us < best_us:
                best, best_us = cur, cur_us
        key = tuning.config_key(fmt, H, I, tuning.bucket_pairs(M, K) / E)
        found[key] = best.to_json() | {"us": round(best_us, 2), "tokens": T}
        if log:
            log(f"{preset} T={T}: {key} -> {best} {best_us:.1f} us")
    return found


# --- entry point ---


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m epmoe.bench.experts", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-30b-a3b", help="comma-separated presets")
    p.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    p.add_argument("--format", default="bf16", help="bf16,fp8,fp8-block,nvfp4")
    p.add_argument("--impl", default="triton,grouped_mm,reference")
    p.add_argument("--routing", default="uniform,skewed")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--flush-l2", action="store_true", help="one routing + L2 flush instead of rotating routings")
    p.add_argument("--json", help="write rows (and the ceilings) to this file")
    p.add_argument("--tune", action="store_true", help="search configs and write a table to --out")
    p.add_argument("--out", help="tuned table path (default: the user cache, see experts/tuning.py)")
    p.add_argument("--budget", type=float, default=300.0, help="tuning seconds per preset")
    args = p.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    device = torch.device("cuda", torch.cuda.current_device())
    if args.tune:
        path = Path(args.out) if args.out else tuning.tuning_dir() / tuning.table_file_name(device_name(device))
        table = json.loads(path.read_text()) if path.exists() else {"device": device_name(device), "configs": {}}
        for preset in args.preset.split(","):
            for fmt in args.format.split(","):
                table["configs"].update(tune_experts(preset, tokens, FORMAT_ALIASES.get(fmt, fmt),
                                                     budget_s=args.budget, log=print))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(table, indent=1, sort_keys=True))
        print(f"wrote {path}")
        return 0
    ceilings = measure_ceilings(device)
    print(f"# {device_name(device)}: HBM copy {ceilings[0]:.2f} TB/s, dense bf16 {ceilings[1]:.0f} TFLOP/s")
    all_rows = []
    for preset in args.preset.split(","):
        rows = bench_experts(preset, tokens, args.format.split(","), args.impl.split(","),
                             args.routing.split(","), iters=args.iters, ceilings=ceilings, rotate=not args.flush_l2)
        for r in rows:
            r["preset"] = preset
        all_rows += rows
        print(f"\n## {preset}\n")
        print(format_table(rows, [*COLUMNS, "note"] if any("note" in r for r in rows) else list(COLUMNS)))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name(device), "hbm_tbps": ceilings[0],
                                               "bf16_tflops": ceilings[1], "rows": all_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
