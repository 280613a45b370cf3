"""`epmoe` command line: demo, doctor, bench, plan.

    epmoe demo                   # every comm backend on 2 ranks vs the single-rank reference (CPU or GPUs)
    epmoe doctor                 # versions, GPUs and links, symmetric memory, default picks
    epmoe bench comm|layer       # dispatch+combine / whole layer timings (CPU: scaled-down shapes by default)
    epmoe bench experts          # expert runners against the roofline: needs a CUDA GPU
    epmoe bench eplb             # max/mean rank load of contiguous experts vs replica plans (epmoe/eplb.py)
    epmoe plan --gpus 8,64 ...   # cost model: predicted time per backend (--measured FILE: next to a bench run)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, VirtualGroup
from epmoe.bench.comm import ladder_from_rows, run_comm_bench, sm_budgets
from epmoe.bench.core import bench, device_name, emit, format_table, options_for, random_inputs, rank_device
from epmoe.bench.eplb import main as bench_eplb
from epmoe.bench.experts import bench_experts
from epmoe.bench.generate import main as bench_generate
from epmoe.bench.layer import bench_layer, default_world, host_rows
from epmoe.bench.plan import Links, compare, plan, preset_of
from epmoe.comm import COMM_BACKENDS
from epmoe.comm.payload import PAYLOADS
from epmoe.comm.symmetric import SymmA2A
from epmoe.config import preset_names
from epmoe.experts import RUNNERS
from epmoe.launch import DistError, DistTimeout, run_ranks
from epmoe.layer import SharedExperts
from epmoe.select import Combo, comm_candidates, crossovers, pick_comm, pick_runner, write_crossovers

# --- demo ---

# Error bounds of the demo's check, relative to the largest reference value: fp32 on the CPU differs from the
# reference only by summation order; bf16 on the GPU rounds x, the weights and the output to 8 mantissa bits
# (~0.4% each), so 2% leaves room for accumulation.
DEMO_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def demo_features(cfg: Any) -> str:
    """What a config exercises, in words: routing, activation, biases, shared experts."""
    k, scale = cfg.top_k, cfg.routed_scaling_factor
    routing = {"softmax": f"softmax top-{k}, {'' if cfg.norm_topk_prob else 'not '}renormalised",
               "softmax_after_topk": f"top-{k} on the logits, softmax over the {k} (GPT-OSS)",
               "sigmoid_bias": f"sigmoid top-{k} picked with a correction bias [E] (MiniMax)",
               "sigmoid_grouped": f"DeepSeek grouped top-{k}: best {cfg.topk_group} of {cfg.n_group} expert groups, "
                                  "sigmoid + correction bias [E]"}[cfg.routing]
    act = {"silu": "SiLU(gate) * up experts", "gelu": "GELU(gate) * up experts",
           "swiglu_clamped": f"GPT-OSS clamped SwiGLU experts (limit {cfg.swiglu_limit:g}, alpha "
                             f"{cfg.swiglu_alpha:g}) with biases b13/b2"}[cfg.activation]
    parts = [routing + (f", weights x{scale:g}" if scale != 1 else ""), act]
    if cfg.shared_experts:
        parts.append(f"{cfg.shared_experts} shared expert{'s' if cfg.shared_experts > 1 else ''} "
                     f"(fused MLP of width {cfg.shared_width})")
    return "; ".join(parts)


def demo_rank(group: Any, cfg: Any, tokens: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Run every registered comm backend on this rank; return one row per backend."""
    g = torch.Generator().manual_seed(1234)  # the model, fp32 on the CPU: the same on every rank (one seed)
    weights = ExpertWeights.random(cfg, cfg.num_experts, generator=g)  # GPT-OSS: with b13 / b2
    bias = torch.randn(cfg.num_experts, generator=g) * 0.1 if cfg.uses_correction_bias else None
    shared = SharedExperts.random(cfg, generator=g) if cfg.shared_experts else None
    on = lambda t, dt=None: None if t is None else t.to(device, dt or t.dtype)  # noqa: E731
    dev_weights = ExpertWeights(on(weights.w13, dtype), on(weights.w2, dtype), on(weights.b13), on(weights.b2))
    parts = {"correction_bias": on(bias),
             "shared": SharedExperts(on(shared.w13, dtype), on(shared.w2, dtype)) if shared else None}
    reference = MoELayer(cfg, weights, correction_bias=bias, shared=shared)  # single rank, fp32, CPU
    inputs = {}  # dp: each rank its own tokens; tp needs every rank to hold the same tokens: rank 0's
    for layout, seed in (("dp", 100 + group.rank), ("tp", 100)):
        x, logits = random_inputs(cfg, tokens, seed, device, dtype)
        inputs[layout] = (x, logits, reference(x.float().cpu(), logits.cpu()))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    for name, cls in sorted(COMM_BACKENDS.items()):
        layout = "dp" if "dp" in cls.layouts and (cls.moves_tokens or group.world == 1) else "tp"
        x, logits, ref = inputs[layout]
        layer = MoELayer.from_global(cfg, dev_weights, group, comm=name, layout=layout,
                                     comm_options=options_for(cls, max_tokens_per_rank=tokens), **parts)
        y = layer(x, logits)  # warm-up (and the checked output)
        ms = bench(lambda: (layer(x, logits), sync()), "cpu", warmup=1, iters=5) / 1e3  # noqa: B023
        err = (y.float().cpu() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        rows.append({"backend": name, "layout": layout, "rank": group.rank, "rel_err": err, "ms": ms})
    return rows


def world_problem(num_experts: int, world: int, max_world: int | None = 8) -> str | None:
    """Why `world` ranks cannot hold `num_experts` experts in contiguous blocks, or None."""
    if world < 1 or (max_world is not None and world > max_world):
        return f"--world {world} is out of range: choose 1 to {max_world} ranks"
    if num_experts % world:
        fits = [w for w in range(1, (max_world or num_experts) + 1) if num_experts % w == 0]
        return (f"--world {world} does not divide the {num_experts} experts (each rank holds an equal block): "
                f"choose --world among {', '.join(map(str, fits))}, or --experts a multiple of {world}")
    return None


def _fail(cmd: str, message: str) -> int:
    print(f"epmoe {cmd}: {message}", file=sys.stderr)
    return 2


def _demo_process(group: Any, cfg: Any, tokens: int) -> list[dict]:
    """One process rank of the demo: its own GPU under NCCL, else the CPU under gloo."""
    device, dtype = rank_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // group.world))
    return demo_rank(group, cfg, tokens, device, dtype)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        cfg = MoEConfig.from_preset(args.preset).scaled(args.hidden, args.intermediate, args.experts)
    except ValueError as exc:
        return _fail("demo", f"{args.preset} cannot be scaled that way: {exc}")
    world, tokens, n_gpu = args.world, args.tokens, torch.cuda.device_count()
    problem = world_problem(cfg.num_experts, world, None if n_gpu == 1 else 8)
    if problem or tokens < 1:
        return _fail("demo", problem or f"--tokens must be >= 1, got {tokens}")
    if n_gpu == 1 and world > 1:
        where, dtype = f"{world} virtual ranks on {torch.cuda.get_device_name(0)}", torch.bfloat16
        per_rank = VirtualGroup(world).run(lambda g: demo_rank(g, cfg, tokens, torch.device("cuda:0"), dtype))
    else:
        use_cuda = n_gpu >= world
        where = f"{world} {'nccl' if use_cuda else 'gloo'} processes on {'GPUs' if use_cuda else 'CPU'}"
        dtype = torch.bfloat16 if use_cuda else torch.float32
        try:
            per_rank = run_ranks(_demo_process, world, args=(cfg, tokens), timeout=args.timeout,
                                 backend="nccl" if use_cuda else "gloo")
        except (DistError, DistTimeout) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
    rows, tol, table = [r for rank_rows in per_rank for r in rank_rows], DEMO_TOL[dtype], []
    for name in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == name]
        err = max(r["rel_err"] for r in mine)
        table.append({"backend": name, "layout": mine[0]["layout"], "max_rel_err": err,
                      "ms_per_call": max(r["ms"] for r in mine), "ok": "yes" if err <= tol else "NO"})
    print(f"epmoe demo: {args.preset} scaled to H={cfg.hidden}, I={cfg.intermediate}, E={cfg.num_experts}, "
          f"top-{cfg.top_k}; {tokens} tokens per rank; {where}; {str(dtype).replace('torch.', '')}")
    print(f"exercises: {demo_features(cfg)}")
    print(f"reference: single-rank fp32 layer; tolerance {tol:g} of the largest output")
    print(format_table(table))
    return 0 if all(r["ok"] == "yes" for r in table) else 1


# --- doctor ---


def _symmetric_memory_status() -> str:
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError as exc:
        return f"not importable ({exc})"
    if not torch.cuda.is_available():
        return "importable; no GPU to allocate on"
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        handle = symm_mem.rendezvous(symm_mem.empty(1024, dtype=torch.uint8, device="cuda"),
                                     dist.group.WORLD.group_name)
        return f"works (1-rank rendezvous, signal pad {handle.signal_pad_size} bytes)"
    except Exception as exc:  # reported, not raised: doctor diagnoses
        return f"fails: {exc!r}"


def _rung(ladder: list[tuple[int | None, str]], i: int) -> str:
    """Rung i of a comm=auto ladder as a rule on the token count T (the largest over ranks)."""
    limit, name = ladder[i]
    prev = ladder[i - 1][0] if i > 0 else None
    if limit is None:
        cond = "any T" if prev is None else f"T > {prev}"
    else:
        cond = f"T <= {limit}" if prev is None else f"{prev} < T <= {limit}"
    return f"{cond} -> {name}"


def _ladder_rule(tokens: int, cands: list[str], ladder: list[tuple[int | None, str]]) -> str:
    """Why select.pick_comm picks what it picks for `tokens` (its rule, without capacities):
    the first rung whose threshold covers T and whose backend is a candidate, else a fallback."""
    skipped = []
    for i, (limit, name) in enumerate(ladder):
        if limit is None or tokens <= limit:
            if name in cands:
                return f"rule {_rung(ladder, i)}" + (f", after {', '.join(skipped)} (not candidates here)"
                                                     if skipped else "")
            skipped.append(name)
    return f"no rung covering T={tokens} has a candidate: fallback along the ladder"


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.is_available()
    device, world = "cuda" if gpu else "cpu", max(torch.cuda.device_count(), 2)
    runner = pick_runner(device, "bf16")
    lines = [("python", platform.python_version()), ("torch", torch.__version__), ("triton", triton_version),
             ("CUDA (torch build)", torch.version.cuda or "none (CPU build)"),
             ("GPUs", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"),
             ("symmetric memory", _symmetric_memory_status()),
             ("comm backends", ", ".join(f"{n} ({'/'.join(c.layouts)}{', host sync' if c.needs_host_sync else ''})"
                                         for n, c in sorted(COMM_BACKENDS.items()))),
             ("expert runners", ", ".join(sorted(RUNNERS))),
             ("runner=auto", f"{runner} ({'GPU present' if gpu else 'no GPU: the plain-torch reference'})")]
    cands = [n for n in comm_candidates(Combo(runner=runner, layout="dp", world=world, device=device)) if n != "none"]
    ladder, source = crossovers(torch.cuda.get_device_name(0) if gpu else "cpu", world)
    if cands:
        rungs = ", ".join(_rung(ladder, i) for i in range(len(ladder)))
        lines += [(f"comm=auto (dp, W={world})", f"candidates: {', '.join(cands)}; ladder: {rungs}"),
                  ("  thresholds from", source)]
        lines += [(f"  {t} tokens", f"-> {pick_comm(t, cands, ladder)} ({_ladder_rule(t, cands, ladder)})")
                  for t in (1, 128, 4096)]
    else:
        lines.append((f"comm=auto (dp, W={world})", "no dp backend registered; one rank or tp layout use 'none'"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    print("\nsymm_a2a workspace per rank (W=8, fp32 combine; SymmA2A.workspace_bytes):")
    for preset in ("deepseek-v3", "qwen3-30b-a3b"):
        cfg = MoEConfig.from_preset(preset)
        cells = [f"Tm={tm} {payload} {SymmA2A.workspace_bytes(cfg, 8, tm, payload) / 2**20:.1f} MiB"
                 for tm in (128, 4096) for payload in ("bf16", "fp8", "nvfp4")]
        print(f"  {preset} (H={cfg.hidden}, top-{cfg.top_k}): " + ", ".join(cells))
    if shutil.which("nvidia-smi"):
        print("\nGPU links (nvidia-smi topo -m):")
        res = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30)
        print(res.stdout.strip() or res.stderr.strip())
    return 0


# --- bench ---


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


# Shapes `epmoe bench comm|layer` use on the CPU unless --full or --hidden/--intermediate/--experts say otherwise
# (the demo's: the full presets take minutes per row and up to 30 GB in fp32 there).
CPU_SHAPES = {"hidden": 256, "intermediate": 96, "experts": 16}
CPU_TOKENS, GPU_TOKENS = "1,8,64", "1,8,64,128,512,2048,4096"


def _available_bytes() -> int | None:
    """Memory the kernel reports available (Linux /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _bench_config(args: argparse.Namespace, on_gpu: bool) -> tuple[Any, str]:
    """The bench's MoEConfig and a line saying how it relates to the preset."""
    full = MoEConfig.from_preset(args.preset)
    base = {"hidden": full.hidden, "intermediate": full.intermediate, "experts": full.num_experts}
    cpu_defaults = not on_gpu and not args.full
    shape = {k: getattr(args, k) or (min(CPU_SHAPES[k], v) if cpu_defaults else v) for k, v in base.items()}
    if shape == base:
        return full, f"{args.preset} at full size"
    cfg = full.scaled(shape["hidden"], shape["intermediate"], shape["experts"])
    why = "the CPU defaults; --full runs the preset's shapes" if cpu_defaults else "as asked"
    return cfg, (f"{args.preset} scaled to H={cfg.hidden}, I={cfg.intermediate}, E={cfg.num_experts}, "
                 f"top-{cfg.top_k} ({why}; --hidden/--intermediate/--experts set them)")


def cmd_bench(args: argparse.Namespace) -> int:
    on_gpu, cmd = torch.cuda.is_available(), f"bench {args.what}"
    if args.what == "generate":
        if not any(a.split("=")[0] == "--preset" for a in args.argv):  # a whole model: one that fits one GPU
            args.preset = "qwen3-30b-a3b"
        return bench_generate(args)
    if args.what == "eplb":
        return bench_eplb(args)
    if args.what == "experts" and not on_gpu:
        return _fail(cmd, "needs a CUDA GPU: it times the GPU expert runners (triton, torch._grouped_mm) against "
                          "the GPU's measured HBM and tensor-core roofline. On the CPU, `epmoe bench layer` and "
                          "`epmoe bench comm` run (scaled down), and `epmoe plan` predicts GPU times.")
    try:
        cfg, shape_note = _bench_config(args, on_gpu)
    except ValueError as exc:
        return _fail(cmd, f"{args.preset} cannot be scaled that way: {exc}")
    tokens_text = args.tokens or (GPU_TOKENS if on_gpu else CPU_TOKENS)
    try:
        tokens = _ints(tokens_text)
    except ValueError:
        return _fail(cmd, f"--tokens takes comma-separated integers, got {tokens_text!r}")
    if not tokens or min(tokens) < 0:
        return _fail(cmd, f"--tokens takes token counts >= 0, got {tokens_text!r}")
    meta = {"command": "epmoe " + " ".join(args.argv), "device": device_name("cuda" if on_gpu else "cpu"),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "preset": args.preset,
            "config": dataclasses.asdict(cfg)}
    if args.what == "layer" and args.host:
        shape_note = ("the preset's transformers model, one MoE layer (full size on a GPU; on the CPU scaled down as "
                      "bench generate's, --hidden/--intermediate/--experts do not apply)")
    print(f"epmoe {cmd}: {shape_note}; tokens per rank {tokens_text}")
    if args.what == "experts":
        if args.hidden or args.intermediate or args.experts:
            return _fail(cmd, "times the preset's full shapes only: drop --hidden/--intermediate/--experts")
        rows = [dict(r, series=f"{r['impl']} {r['format']} {r['routing']}")
                for r in bench_experts(args.preset, tokens, args.format.split(","))]
        emit(rows, args, meta, series="series", title=f"experts stage, {args.preset}")
        return 0
    if args.what == "layer" and args.host:
        rows = host_rows(args.preset, tokens, torch.device("cuda" if on_gpu else "cpu"))
        print("host us: median wall time of the Python call (GPU drained before each); gpu us: CUDA events"
              + ("" if on_gpu else " (none on the CPU, where the host does the work)"))
        emit(rows, args, meta, series="impl", title=f"host time per call, {args.preset}", y="host_us")
        return 0

    world = args.world or (default_world() if args.what == "layer" else 2)
    problem = world_problem(cfg.num_experts, world, None if torch.cuda.device_count() == 1 else 8)
    if problem:
        return _fail(cmd, problem)
    meta.update(world=world)
    try:
        budgets = sm_budgets(args.sm_budget)
    except ValueError as exc:
        return _fail(cmd, str(exc))
    if args.what == "layer":
        # fp32 bytes of one rank's expert weights and shared experts (what bench layer allocates on the CPU)
        need, have = 4 * 3 * cfg.hidden * (cfg.intermediate * (cfg.num_experts // world) + cfg.shared_width), \
            _available_bytes()
        if not on_gpu and have is not None and need * world > 0.8 * have:  # every rank on this machine
            return _fail(cmd, f"{cfg.num_experts // world} experts per rank of H={cfg.hidden}, I={cfg.intermediate} "
                              f"take {need / 1e9:.1f} GB in fp32 per rank ({world} on this machine), more than it has "
                              f"available ({have / 1e9:.1f} GB): scale the preset down with "
                              "--hidden/--intermediate/--experts (drop --full for the CPU defaults) or run on a GPU")
        try:
            rows = bench_layer(cfg, tokens, comm=args.comm, runner=args.runner, world=world,
                               shared_stream=args.shared_stream, sm_budget=budgets)
        except (ValueError, DistError, DistTimeout) as exc:
            return _fail(cmd, str(exc))
        if rows:
            r = rows[0]
            roof = (f"expert roofline from {r['rates']}: HBM {r['hbm_TBps']:.2f} TB/s, {r['TFLOPs']:.0f} TFLOP/s"
                    if "hbm_TBps" in r else r["rates"])
            print(f"W={world}, ranks: {r['ranks']}; {roof}; timing: graph = replays of MoELayer.capture_graphs, "
                  "eager = forward()")
        emit(rows, args, meta, series=lambda r: f"{r['comm']} {r['shared_stream']}" if "shared_stream" in r
             else r["comm"], title=f"MoE layer forward, {args.preset}, W={world}")
        return 0
    try:
        modes = tuple(m for m in (args.symm_combine or "push").split(",") if m)
        rows = run_comm_bench(cfg, world, tokens, args.backend, [p for p in args.payload.split(",") if p],
                              args.iters or 20, args.static, modes, budgets)
    except (ValueError, DistError, DistTimeout) as exc:
        return _fail(cmd, str(exc))
    for r in rows:  # the round trip, what the plot shows (the rows keep each phase)
        r["round_trip_us"] = r["dispatch_us"] + r["combine_us"]
    emit(rows, args, meta, series="backend", title=f"dispatch+combine, {args.preset}, W={world}", y="round_trip_us",
         ylabel="dispatch + combine µs")
    if args.store_crossovers:
        gpu = torch.cuda.get_device_name(0) if on_gpu and rows and rows[0].get("ranks") != "gloo" else "cpu"
        try:
            world, ladder = ladder_from_rows(rows)
        except ValueError as exc:
            print(f"crossovers not stored: {exc}", file=sys.stderr)
            return 1
        path = write_crossovers(gpu, world, ladder, None if args.store_crossovers is True else args.store_crossovers)
        print(f"crossovers for {gpu}, W={world}: {ladder} -> {path}")
    return 0


# --- plan ---

PLAN_DEFAULTS = {"preset": "deepseek-v3", "gpus": "8,16,64,256", "tokens": "1,128,4096"}


def _measured_rows(args: argparse.Namespace, rows: list[dict]) -> tuple[list[dict], str | None]:
    """The file's rows that --gpus / --tokens select, or (rows, why they conflict with the file)."""
    for flag, key in (("gpus", "world"), ("tokens", "tokens")):
        given = getattr(args, flag)
        if given is None:
            continue
        have, want = sorted({int(r.get(key, 1)) for r in rows}), _ints(given)
        if any(v not in have for v in want):
            return rows, (f"--{flag} {given} conflicts with --measured {args.measured}: its rows were measured at "
                          f"{key} {', '.join(map(str, have))} (drop --{flag}, or pick among those)")
        rows = [r for r in rows if int(r.get(key, 1)) in want]
    return rows, None


def cmd_plan(args: argparse.Namespace) -> int:
    rates = {k: v for k, v in (("hbm_tbps", args.hbm_tbps), ("tflops", args.tflops)) if v is not None}
    links = Links(nvlink_gbps=args.nvlink_gbps, net_gbps=args.net_gbps, gpus_per_node=args.gpus_per_node, **rates)
    if not args.measured:
        preset = args.preset or PLAN_DEFAULTS["preset"]
        rows = plan(MoEConfig.from_preset(preset), _ints(args.gpus or PLAN_DEFAULTS["gpus"]),
                    _ints(args.tokens or PLAN_DEFAULTS["tokens"]), links, payload=args.payload, weights=args.weights,
                    combine_bytes=args.combine_bytes)
        print(f"cost model, {preset}: {links}; combine partial sums {args.combine_bytes} bytes per element")
        print(format_table(rows))
        return 0
    try:
        with open(args.measured) as f:
            data = json.load(f)
        meta, rows = data.get("meta", {}), data["rows"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return _fail("plan", f"--measured {args.measured}: not a file written by `epmoe bench ... --json` ({exc})")
    measured_preset = preset_of(meta)
    if args.preset and measured_preset and args.preset != measured_preset:
        return _fail("plan", f"--preset {args.preset} conflicts with --measured {args.measured}, which was "
                             f"measured with {measured_preset}: drop --preset")
    rows, conflict = _measured_rows(args, rows)
    if conflict:
        return _fail("plan", conflict)
    preset = measured_preset or args.preset or PLAN_DEFAULTS["preset"]
    cfg = MoEConfig(**meta["config"]) if meta.get("config") else MoEConfig.from_preset(preset)
    shape = "" if cfg == MoEConfig.from_preset(preset) else \
        f" scaled to H={cfg.hidden}, I={cfg.intermediate}, E={cfg.num_experts}"
    print(f"cost model vs {args.measured} ({meta.get('command', '?')}; {meta.get('device', '?')}), {preset}{shape}: "
          f"{links}")
    print("ratio = measured / predicted; layer rows use the HBM and TFLOP/s rates measured in that run unless "
          "--hbm-tbps / --tflops are given; rows timed on the CPU get no ratio (the model's rates are a GPU's)")
    print(format_table(compare(cfg, rows, links, use_row_rates=not rates)))
    return 0


# --- parser ---


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default (options whose default depends on the machine say so in words)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class _TopHelp(_Help, argparse.RawDescriptionHelpFormatter):
    """The top-level help: the module docstring as written."""


def build_parser() -> argparse.ArgumentParser:
    """The `epmoe` parser: one sub-command per cmd_* function."""
    p = argparse.ArgumentParser(prog="epmoe", description=__doc__, formatter_class=_TopHelp)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{demo,doctor,bench,plan}")

    def parser(name: str, text: str, fn: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=text, description=text, formatter_class=_Help)
        sp.set_defaults(fn=fn)
        return sp

    def shape(sp: argparse.ArgumentParser, fixed: bool) -> None:  # --hidden/--intermediate/--experts
        for k, text in (("hidden", "model width H"), ("intermediate", "expert intermediate size I"),
                        ("experts", "routed experts E (top-k kept, at most E)")):
            sp.add_argument(f"--{k}", type=int, default=CPU_SHAPES[k] if fixed else None, help=text if fixed else
                            f"scale the preset: {text} (default: the preset's on a GPU, {CPU_SHAPES[k]} on the CPU)")

    d = parser("demo", "run every comm backend on several ranks against the single-rank reference", cmd_demo)
    d.add_argument("--preset", default="qwen3-30b-a3b", choices=preset_names(), help="model whose layer to scale down")
    d.add_argument("--world", type=int, default=2, help="ranks (processes, or virtual ranks on one GPU); must divide E")
    d.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    shape(d, fixed=True)
    d.add_argument("--timeout", type=float, default=300, help="seconds before a rank that does not answer fails")
    parser("doctor", "versions, GPUs and links, symmetric memory, default choices", cmd_doctor)
    b = parser("bench", "benchmarks: comm, layer, experts (GPU only), generate, eplb (docs/bench.md)", cmd_bench)
    b.add_argument("what", choices=["comm", "experts", "layer", "generate", "eplb"], help="what to time")
    b.add_argument("--preset", default="deepseek-v3", choices=preset_names(),
                   help="model whose layer to time (bench generate: qwen3-30b-a3b, the whole model fits one GPU)")
    shape(b, fixed=False)
    b.add_argument("--full", action="store_true", help="on the CPU too, the preset's full shapes (slow, large)")
    b.add_argument("--tokens", help=f"tokens per rank, comma-separated (default: {GPU_TOKENS}; CPU: {CPU_TOKENS})")
    b.add_argument("--backend", default="all", help="comm: comma-separated backends or 'all'")
    b.add_argument("--comm", default="all", help="layer: comma-separated backends, 'auto' or 'all' (each + auto)")
    b.add_argument("--runner", default="auto", help="layer: expert runner or 'auto'")
    b.add_argument("--world", type=int, help="ranks (default: comm 2, layer one per GPU, 1 on the CPU)")
    b.add_argument("--payload", default="bf16", help="comm: payload format(s), comma-separated")
    b.add_argument("--iters", type=int, default=20, help="comm: timed iterations per row")
    b.add_argument("--symm-combine", default="push,pull", help="comm: symm_a2a combine modes (push, pull) to time")
    b.add_argument("--sm-budget", metavar="SMS", help="comm, layer: symm_a2a rows per SM budget, comma-separated SM "
                   "counts its kernels may occupy or 'all' (its default grids), e.g. 8,16,all (default: all)")
    b.add_argument("--static", action="store_true", help="comm: allgather/nccl_a2a with static_shapes (graphs on GPUs)")
    b.add_argument("--store-crossovers", nargs="?", const=True, metavar="PATH",
                   help="comm: store the comm='auto' ladder (default PATH: epmoe/tuning/crossovers.json)")
    b.add_argument("--format", default="bf16", help="experts: weight formats, comma-separated")
    b.add_argument("--shared-stream", metavar="MODES", help="layer: comma-separated on,off,default,routed,shared")
    b.add_argument("--host", action="store_true", help="layer: host µs per call next to GPU µs (transformers model)")
    b.add_argument("--batch", default="1,16,64", help="generate: comma-separated batch sizes")
    b.add_argument("--prompt", type=int, help="generate: prompt tokens (default: 512 on a GPU, 16 on the CPU)")
    b.add_argument("--new", type=int, help="generate: new tokens (default: 32 on a GPU, 4 on the CPU)")
    b.add_argument("--mode", default="eager,static", help="generate: eager and/or static (static cache, compiled)")
    b.add_argument("--layers", type=int, help="generate: decoder layers (default: the model's own)")
    b.add_argument("--graphs", type=int, default=0, help="generate (GPU): also time CUDA graphs up to this many tokens")
    b.add_argument("--redundant", default="0,8,32,64", help="eplb: redundant expert slots, comma-separated")
    b.add_argument("--nodes", type=int, default=1, help="eplb: nodes the ranks span (hierarchical balancing)")
    b.add_argument("--json", help="write the rows as JSON here (`epmoe plan --measured` reads it)")
    b.add_argument("--plot", help="write a PNG plot of time vs tokens here")
    pl = parser("plan", "predict each backend's time from bytes moved and link rates", cmd_plan)
    pl.add_argument("--preset", choices=preset_names(), help=f"model ({PLAN_DEFAULTS['preset']}, or the file's)")
    for flag, text in (("gpus", "comma-separated EP world sizes"), ("tokens", "tokens per rank")):
        pl.add_argument(f"--{flag}", help=f"{text} (default: {PLAN_DEFAULTS[flag]}; with --measured: selects rows)")
    pl.add_argument("--nvlink-gbps", type=float, default=450.0, help="per-GPU NVLink bandwidth, GB/s")
    pl.add_argument("--net-gbps", type=float, default=50.0, help="per-GPU network bandwidth, GB/s")
    pl.add_argument("--gpus-per-node", type=int, default=8, help="ranks sharing one NVLink domain")
    for flag, text in (("payload", "dispatch payload format"), ("weights", "expert weight format")):
        pl.add_argument(f"--{flag}", default="bf16", choices=PAYLOADS, help=text)
    pl.add_argument("--combine-bytes", type=int, default=4, choices=[2, 4], help="combine wire bytes per element")
    pl.add_argument("--hbm-tbps", type=float, help="HBM bandwidth, TB/s (default: the model's, 4.2)")
    pl.add_argument("--tflops", type=float, help="dense bf16 tensor-core TFLOP/s (default: the model's, 790)")
    pl.add_argument("--measured", metavar="FILE.json", help="`epmoe bench comm|layer --json` rows to compare with")
    return p


def main(argv: list[str] | None = None) -> int:
    """`epmoe ...` (also `python -m epmoe`): parse `argv` and run the command; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
