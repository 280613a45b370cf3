"""`epmoe` command line: demo, doctor, bench.

    epmoe demo                      # every comm backend on 2 ranks vs the single-rank reference
    epmoe doctor                    # versions, GPUs and links, symmetric memory, default picks
    epmoe bench comm|experts|layer  # benchmarks (see `epmoe bench -h`)
    epmoe plan --gpus 8,64 ...      # cost model: predicted time per backend
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import torch

from epmoe.bench.core import device_name, format_table, plot_time_vs_tokens, write_json

# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------

# Error bounds of the demo's check, relative to the largest reference value: fp32 on the CPU
# differs from the reference only by summation order; bf16 on the GPU rounds x, the weights
# and the output to 8 mantissa bits (~0.4% each), so 2% leaves room for accumulation.
DEMO_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _demo_setup(cfg: Any, rank: int, tokens: int, device: torch.device, dtype: torch.dtype):
    from epmoe import ExpertWeights

    g = torch.Generator().manual_seed(1234)
    weights = ExpertWeights.random(cfg, cfg.num_experts, generator=g)  # identical on every rank
    gr = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, cfg.hidden, generator=gr)
    logits = torch.randn(tokens, cfg.num_experts, generator=gr)
    return weights, x.to(device, dtype), logits.to(device)


def demo_rank(group: Any, cfg: Any, tokens: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Run every registered comm backend on this rank; return one row per backend."""
    import dataclasses

    from epmoe import MoELayer
    from epmoe.comm import COMM_BACKENDS

    rank, world = group.rank, group.world
    weights, x, logits = _demo_setup(cfg, rank, tokens, device, dtype)
    dev_weights = type(weights)(weights.w13.to(device, dtype), weights.w2.to(device, dtype))
    reference = MoELayer(cfg, weights)(x.float().cpu(), logits.cpu())  # single rank, fp32, CPU
    # The tp layout needs every rank to hold the same tokens: all ranks use rank 0's.
    x_all, logits_all = _demo_setup(cfg, 0, tokens, device, dtype)[1:]
    ref_all = MoELayer(cfg, weights)(x_all.float().cpu(), logits_all.cpu())
    rows = []
    for name, cls in sorted(COMM_BACKENDS.items()):
        layout = "dp" if "dp" in cls.layouts and not (name == "none" and world > 1) else "tp"
        xi, li, ref = (x, logits, reference) if layout == "dp" else (x_all, logits_all, ref_all)
        layer = MoELayer.from_global(
            cfg, dev_weights, group, comm=name, layout=layout,
            comm_options={"max_tokens_per_rank": tokens} if "max_tokens_per_rank" in
            {f.name for f in dataclasses.fields(cls.Options)} else {},
        )
        y = layer(xi, li)  # warm-up (and the checked output)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(5):
            layer(xi, li)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ms = (time.perf_counter() - t0) / 5 * 1e3
        err = (y.float().cpu() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        rows.append({"backend": name, "layout": layout, "rank": rank, "rel_err": err, "ms": ms})
    return rows


def _demo_process(group: Any, cfg: Any, tokens: int) -> list[dict]:
    """One process rank of the demo: its own GPU under NCCL, else the CPU under gloo."""
    use_cuda = torch.cuda.is_available() and torch.distributed.get_backend() == "nccl"
    device = torch.device(f"cuda:{group.rank}") if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // group.world))
    return demo_rank(group, cfg, tokens, device, torch.bfloat16 if use_cuda else torch.float32)


def cmd_demo(args: argparse.Namespace) -> int:
    from epmoe import MoEConfig, VirtualGroup

    cfg = MoEConfig.from_preset(args.preset).scaled(args.hidden, args.intermediate, args.experts)
    world, tokens = args.world, args.tokens
    n_gpu = torch.cuda.device_count()
    if n_gpu == 1 and world > 1:
        where = f"{world} virtual ranks on {torch.cuda.get_device_name(0)}"
        rows = [r for rank_rows in VirtualGroup(world).run(
            lambda g: demo_rank(g, cfg, tokens, torch.device("cuda:0"), torch.bfloat16)) for r in rank_rows]
        dtype = torch.bfloat16
    else:
        from epmoe.launch import DistError, DistTimeout, run_ranks

        use_cuda = n_gpu >= world
        where = f"{world} {'nccl' if use_cuda else 'gloo'} processes on {'GPUs' if use_cuda else 'CPU'}"
        dtype = torch.bfloat16 if use_cuda else torch.float32
        try:
            per_rank = run_ranks(_demo_process, world, args=(cfg, tokens), timeout=args.timeout,
                                 backend="nccl" if use_cuda else "gloo")
        except (DistError, DistTimeout) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        rows = [r for rank_rows in per_rank for r in rank_rows]
    tol = DEMO_TOL[dtype]
    table = []
    for name in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == name]
        err = max(r["rel_err"] for r in mine)
        table.append({
            "backend": name, "layout": mine[0]["layout"], "max_rel_err": err,
            "ms_per_call": max(r["ms"] for r in mine), "ok": "yes" if err <= tol else "NO",
        })
    print(f"epmoe demo: {args.preset} scaled to H={cfg.hidden}, I={cfg.intermediate}, E={cfg.num_experts}, "
          f"top-{cfg.top_k}; {tokens} tokens per rank; {where}; {str(dtype).replace('torch.', '')}")
    print(f"reference: single-rank fp32 layer; tolerance {tol:g} of the largest output")
    print(format_table(table))
    return 0 if all(r["ok"] == "yes" for r in table) else 1


# ---------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------


def _symmetric_memory_status() -> str:
    try:
        import torch.distributed._symmetric_memory as symm_mem  # noqa: F401
    except ImportError as exc:
        return f"not importable ({exc})"
    if not torch.cuda.is_available():
        return "importable; no GPU to allocate on"
    try:
        import torch.distributed as dist

        if not dist.is_initialized():
            store = dist.HashStore()
            dist.init_process_group("nccl", store=store, rank=0, world_size=1)
        buf = symm_mem.empty(1024, dtype=torch.uint8, device="cuda")
        handle = symm_mem.rendezvous(buf, dist.group.WORLD.group_name)
        return f"works (1-rank rendezvous, signal pad {handle.signal_pad_size} bytes)"
    except Exception as exc:  # reported, not raised: doctor diagnoses
        return f"fails: {exc!r}"


def _rung(ladder: list[tuple[int | None, str]], i: int) -> str:
    """Rung i of a comm=auto ladder as a rule on the token count T (the largest over ranks)."""
    limit, name = ladder[i]
    prev = ladder[i - 1][0] if i > 0 else None
    if limit is None:
        cond = f"T > {prev}" if prev is not None else "any T"
    else:
        cond = f"{prev} < T <= {limit}" if prev is not None else f"T <= {limit}"
    return f"{cond} -> {name}"


def _ladder_rule(tokens: int, cands: list[str], ladder: list[tuple[int | None, str]], source: str) -> str:
    """Why select.pick_comm picks what it picks for `tokens` (its rule, without capacities):
    the first rung whose threshold covers T and whose backend is a candidate, else a fallback."""
    skipped = []
    for i, (limit, name) in enumerate(ladder):
        if limit is None or tokens <= limit:
            if name in cands:
                why = f"rule {_rung(ladder, i)}"
                if skipped:
                    why += f", after {', '.join(skipped)} (not candidates here)"
                return f"{why}; thresholds from {source}"
            skipped.append(name)
    return f"no rung covering T={tokens} has a candidate: fallback along the ladder; thresholds from {source}"


def cmd_doctor(args: argparse.Namespace) -> int:
    from epmoe.comm import COMM_BACKENDS
    from epmoe.experts import RUNNERS

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("CUDA (torch build)", torch.version.cuda or "none (CPU build)"),
        ("GPUs", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"),
        ("symmetric memory", _symmetric_memory_status()),
        ("comm backends", ", ".join(f"{n} ({'/'.join(c.layouts)}{', host sync' if c.needs_host_sync else ''})"
                                    for n, c in sorted(COMM_BACKENDS.items()))),
        ("expert runners", ", ".join(sorted(RUNNERS))),
    ]
    from epmoe.select import Combo, comm_candidates, crossovers, pick_comm, pick_runner

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    runner = pick_runner(device, "bf16")
    lines.append(("runner=auto", f"{runner} ({'GPU present' if gpu else 'no GPU: the plain-torch reference'})"))
    world = max(torch.cuda.device_count(), 2)
    cands = [n for n in comm_candidates(Combo(runner=runner, layout="dp", world=world, device=device)) if n != "none"]
    ladder, source = crossovers(torch.cuda.get_device_name(0) if gpu else "cpu", world)
    if cands:
        rungs = ", ".join(_rung(ladder, i) for i in range(len(ladder)))
        lines.append((f"comm=auto (dp, W={world})", f"candidates: {', '.join(cands)}; ladder: {rungs}; from {source}"))
        for t in (1, 128, 4096):
            rule = _ladder_rule(t, cands, ladder, source)
            lines.append((f"  {t} tokens", f"-> {pick_comm(t, cands, ladder)} ({rule})"))
    else:
        lines.append((f"comm=auto (dp, W={world})", "no dp backend registered; one rank or tp layout use 'none'"))
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k.ljust(width)}  {v}")
    print("\nsymm_a2a workspace per rank (W=8, fp32 combine; SymmA2A.workspace_bytes):")
    from epmoe.comm.symmetric import SymmA2A
    from epmoe.config import MoEConfig

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


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _emit(rows: list[dict], args: argparse.Namespace, series: str, title: str, meta: dict) -> None:
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        roof = {r["tokens"]: r["expert_roofline_us"] for r in rows if "expert_roofline_us" in r} or None
        plot_time_vs_tokens(rows, args.plot, series=series, title=title, roofline=roof)
        print(f"wrote {args.plot}")


def cmd_bench(args: argparse.Namespace) -> int:
    meta = {"command": "epmoe " + " ".join(sys.argv[1:]), "device": device_name(
        "cuda" if torch.cuda.is_available() else "cpu"), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d")}
    if args.what == "layer":
        from epmoe.bench.layer import bench_layer, default_world

        world = args.world or default_world()
        rows = bench_layer(args.preset, _ints(args.tokens), comm=args.comm, runner=args.runner, world=world)
        meta.update(preset=args.preset, world=world)
        if rows:
            r = rows[0]
            print(f"W={world}, ranks: {r['ranks']}; expert roofline from {r['rates']}: HBM {r['hbm_TBps']:.2f} TB/s, "
                  f"{r['TFLOPs']:.0f} TFLOP/s; timing: graph = replays of MoELayer.capture_graphs, eager = forward()")
        _emit(rows, args, series="comm", title=f"MoE layer forward, {args.preset}, W={world}", meta=meta)
        return 0
    if args.what == "experts":
        from epmoe.bench.experts import bench_experts

        rows = bench_experts(args.preset, _ints(args.tokens), args.format.split(","))
        _emit(rows, args, series="impl", title=f"experts stage, {args.preset}", meta=meta)
        return 0
    from epmoe.bench.comm import ladder_from_rows, run_comm_bench

    rows = run_comm_bench(args)
    _emit(rows, args, series="backend", title=f"dispatch+combine, {args.preset}", meta=meta)
    if args.store_crossovers:
        from epmoe.select import write_crossovers

        on_gpu = torch.cuda.is_available() and rows and rows[0].get("ranks") != "gloo"
        gpu = torch.cuda.get_device_name(0) if on_gpu else "cpu"
        try:
            world, ladder = ladder_from_rows(rows)
        except ValueError as exc:
            print(f"crossovers not stored: {exc}", file=sys.stderr)
            return 1
        path = write_crossovers(gpu, world, ladder, None if args.store_crossovers is True else args.store_crossovers)
        print(f"crossovers for {gpu}, W={world}: {ladder} -> {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from epmoe import MoEConfig
    from epmoe.bench.plan import Links, compare, plan, preset_of

    rates = {k: v for k, v in (("hbm_tbps", args.hbm_tbps), ("tflops", args.tflops)) if v is not None}
    links = Links(nvlink_gbps=args.nvlink_gbps, net_gbps=args.net_gbps, gpus_per_node=args.gpus_per_node, **rates)
    if args.measured:
        data = json.loads(open(args.measured).read())
        meta, rows = data.get("meta", {}), data["rows"]
        preset = preset_of(meta) or args.preset
        table = compare(MoEConfig.from_preset(preset), rows, links, use_row_rates=not rates)
        source = f"{meta.get('command', '?')}; {meta.get('device', '?')}"
        print(f"cost model vs {args.measured} ({source}), {preset}: {links}")
        print("ratio = measured / predicted; layer rows use the HBM and TFLOP/s rates measured in that run "
              "unless --hbm-tbps / --tflops are given")
        print(format_table(table))
        return 0
    cfg = MoEConfig.from_preset(args.preset)
    rows = plan(cfg, _ints(args.gpus), _ints(args.tokens), links, payload=args.payload, weights=args.weights,
                combine_bytes=args.combine_bytes)
    print(f"cost model, {args.preset}: {links}; combine partial sums {args.combine_bytes} bytes per element")
    print(format_table(rows))
    return 0


# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from epmoe.config import preset_names

    p = argparse.ArgumentParser(prog="epmoe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="run every comm backend on several ranks against the reference")
    d.add_argument("--preset", default="qwen3-30b-a3b", choices=preset_names())
    d.add_argument("--world", type=int, default=2, help="ranks (processes, or virtual ranks on one GPU)")
    d.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    d.add_argument("--hidden", type=int, default=256)
    d.add_argument("--intermediate", type=int, default=96)
    d.add_argument("--experts", type=int, default=16)
    d.add_argument("--timeout", type=float, default=300)
    d.set_defaults(fn=cmd_demo)

    doc = sub.add_parser("doctor", help="versions, GPUs and links, symmetric memory, default choices")
    doc.set_defaults(fn=cmd_doctor)

    b = sub.add_parser("bench", help="benchmarks: comm (dispatch/combine), experts (runners), layer (whole forward)")
    b.add_argument("what", choices=["comm", "experts", "layer"])
    b.add_argument("--preset", default="deepseek-v3", choices=preset_names())
    b.add_argument("--tokens", default="1,8,64,128,512,2048,4096", help="comma-separated tokens per rank")
    b.add_argument("--backend", default="all", help="comm: comma-separated backends or 'all'")
    b.add_argument("--comm", default="all", help="layer: comma-separated backends, 'auto' or 'all' (each + auto)")
    b.add_argument("--runner", default="auto", help="layer: expert runner or 'auto'")
    b.add_argument("--world", type=int, default=None,
                   help="ranks: processes (NCCL per GPU, or gloo on the CPU), or virtual ranks on one GPU "
                        "(default: 2 for comm; for layer the number of GPUs, 1 on the CPU)")
    b.add_argument("--payload", default="bf16", help="comm: payload format(s), comma-separated")
    b.add_argument("--iters", type=int, default=20, help="comm: timed iterations per row")
    b.add_argument("--symm-combine", default="push,pull",
                   help="comm: symm_a2a combine modes to time side by side (push: peers write the partial sums "
                        "home; pull: the home reads them), comma-separated")
    b.add_argument("--static", action="store_true",
                   help="comm: build allgather/nccl_a2a with static_shapes (no host sync: timed through CUDA graphs "
                        "on GPU ranks)")
    b.add_argument("--store-crossovers", nargs="?", const=True, default=None, metavar="PATH",
                   help="comm: store the fastest backend per token count as the comm='auto' ladder of this GPU "
                        "model and world size (default file: epmoe/tuning/crossovers.json)")
    b.add_argument("--format", default="bf16", help="experts: weight formats, comma-separated")
    b.add_argument("--json", help="write the rows as JSON here")
    b.add_argument("--plot", help="write a PNG plot of time vs tokens here")
    b.set_defaults(fn=cmd_bench)

    pl = sub.add_parser("plan", help="predict each backend's time from bytes moved and link rates")
    pl.add_argument("--preset", default="deepseek-v3", choices=preset_names())
    pl.add_argument("--gpus", default="8,16,64,256")
    pl.add_argument("--tokens", default="1,128,4096", help="tokens per rank")
    pl.add_argument("--nvlink-gbps", type=float, default=450.0)
    pl.add_argument("--net-gbps", type=float, default=50.0)
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--payload", default="bf16", choices=["bf16", "fp8", "fp8_block", "nvfp4"])
    pl.add_argument("--weights", default="bf16", choices=["bf16", "fp8", "fp8_block", "nvfp4"])
    pl.add_argument("--combine-bytes", type=int, default=4, choices=[2, 4],
                    help="bytes per partial-sum element on the combine wire: 4 = fp32, the backends' default "
                         "combine_dtype; 2 = combine_dtype bf16")
    pl.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth, TB/s (default: the model's, 4.2)")
    pl.add_argument("--tflops", type=float, default=None,
                    help="dense bf16 tensor-core TFLOP/s (default: the model's, 790)")
    pl.add_argument("--measured", metavar="FILE.json",
                    help="rows written by `epmoe bench comm --json` or `epmoe bench layer --json`: print predicted "
                         "and measured side by side with their ratio")
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
