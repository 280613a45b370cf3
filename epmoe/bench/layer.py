"""`epmoe bench layer`: the whole MoE layer forward per comm backend and token count.

Ranks are real processes (NCCL with one GPU each, or gloo on the CPU) or, on a single GPU,
virtual ranks (threads sharing the GPU, so their traffic goes through HBM). Each row is the
slowest rank's median time of one forward, next to the roofline of its expert stage:
max(touched expert weight bytes / HBM bandwidth, FLOPs / tensor-core rate) for uniform routing.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from epmoe.bench.core import bench
from epmoe.bench.plan import Links, predict
from epmoe.comm import accepted_options, get_comm
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights
from epmoe.group import RankGroup, VirtualGroup
from epmoe.layer import MoELayer
from epmoe.select import Combo, comm_candidates, pick_runner


def _roofline_us(cfg: MoEConfig, world: int, tokens: int) -> float:
    row = predict(cfg, world, tokens, "nccl_a2a", Links())
    return float(row["experts_us"]) if row else float("nan")


def _layers(cfg: MoEConfig, group: RankGroup | None, comms: list[str], runner: str, device: torch.device,
            dtype: torch.dtype, max_tokens: int) -> dict[str, MoELayer]:
    world = group.world if group is not None else 1
    rank = group.rank if group is not None else 0
    local = cfg.num_experts // world
    g = torch.Generator().manual_seed(1000 + rank)
    weights = ExpertWeights.random(cfg, local, dtype=dtype, device=device, generator=g)
    return {
        c: MoELayer(cfg, weights, group, comm=c, runner=runner,
                    comm_options=_options(c, max_tokens))
        for c in comms
    }


def _options(comm: str, max_tokens: int) -> dict[str, Any]:
    wanted = {"max_tokens_per_rank": max_tokens}
    if comm == "auto":
        return wanted  # auto hands each candidate the options it names
    return accepted_options(get_comm(comm), wanted)


def _inputs(cfg: MoEConfig, tokens: int, rank: int, device: torch.device, dtype: torch.dtype):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, cfg.hidden, generator=g).to(device, dtype)
    logits = torch.randn(tokens, cfg.num_experts, generator=g).to(device)
    return x, logits


def layer_rank(group: RankGroup | None, cfg: MoEConfig, tokens: list[int], comms: list[str], runner: str,
               iters: int = 10) -> list[dict[str, Any]]:
    """Time every (comm, tokens) on this rank; rows carry the slowest rank's time."""
    world = group.world if group is not None else 1
    rank = group.rank if group is not None else 0
    on_gpu = torch.cuda.is_available() and (world == 1 or torch.distributed.get_backend() == "nccl")
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    layers = _layers(cfg, group, comms, runner, device, dtype, max(tokens))
    rows = []
    for comm, layer in layers.items():
        for t in tokens:
            x, logits = _inputs(cfg, t, rank, device, dtype)

            def step(layer: MoELayer = layer, x: torch.Tensor = x, logits: torch.Tensor = logits) -> None:
                layer(x, logits)

            if group is not None and world > 1:
                group.barrier()
            us = bench(step, device=device, warmup=2, iters=iters, flush_l2=False)
            if group is not None and world > 1:
                us = float(group.all_gather(torch.tensor([us], device=device)).max())
            rows.append({"comm": comm, "runner": runner, "tokens": t, "us": us,
                         "expert_roofline_us": _roofline_us(cfg, world, t)})
    return rows


def _virtual_rows(cfg: MoEConfig, tokens: list[int], comms: list[str], runner: str, world: int,
                  iters: int) -> list[dict[str, Any]]:
    """Virtual ranks on one GPU: time a whole group step (all ranks' forwards) with wall clock."""
    device = torch.device("cuda:0")
    vg = VirtualGroup(world)
    layers = vg.run(lambda g: _layers(cfg, g, comms, runner, device, torch.bfloat16, max(tokens)))
    rows = []
    for comm in comms:
        for t in tokens:
            inputs = [_inputs(cfg, t, r, device, torch.bfloat16) for r in range(world)]

            def step(g: RankGroup, comm: str = comm, inputs: list = inputs) -> None:
                layers[g.rank][comm](*inputs[g.rank])

            for _ in range(2):
                vg.run(step)
            torch.cuda.synchronize()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                vg.run(step)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e6)
            times.sort()
            rows.append({"comm": f"{comm} (virtual x{world})", "runner": runner, "tokens": t,
                         "us": times[len(times) // 2], "expert_roofline_us": _roofline_us(cfg, world, t)})
    return rows


def bench_layer(preset: str, tokens: list[int], comm: str = "all", runner: str = "auto", world: int = 1,
                iters: int = 10) -> list[dict[str, Any]]:
    """Rows (comm, runner, tokens, us, expert_roofline_us) for every requested backend."""
    from epmoe.launch import run_ranks

    cfg = MoEConfig.from_preset(preset)
    n_gpu = torch.cuda.device_count()
    device = "cuda" if n_gpu else "cpu"
    if runner == "auto":
        runner = pick_runner(device, "bf16")
    if comm in ("all", "auto"):
        combo = Combo(runner=runner, layout="dp", world=world, device=device)
        names = ["none"] if world == 1 else [n for n in comm_candidates(combo) if n != "none"]
        comms = names + (["auto"] if comm == "all" and len(names) > 1 else [])
    else:
        comms = comm.split(",")
    if not comms:
        raise ValueError(f"no registered comm backend serves the dp layout on {world} ranks with runner {runner!r}")
    if world == 1:
        return layer_rank(None, cfg, tokens, comms, runner, iters)
    if n_gpu == 1:
        return _virtual_rows(cfg, tokens, comms, runner, world, iters)
    per_rank = run_ranks(layer_rank, world, args=(cfg, tokens, comms, runner, iters), timeout=1800,
                         backend="nccl" if n_gpu >= world else "gloo")
    return per_rank[0]
