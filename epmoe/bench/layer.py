"""`epmoe bench layer`: the whole MoE layer forward per comm backend and token count.

    rates   = HBM copy TB/s and bf16 matmul TFLOP/s measured on this GPU (none on the CPU)
    for comm, T:
        layer(x [T, H], logits [T, E])        uniform random routing, bf16 on the GPU (fp32 on the CPU)
        timing "graph": capturable layers (select.py: no host sync) captured by MoELayer.capture_graphs(T,
                        buckets=[T]), replays timed (no launch overhead, as a serving engine runs decode)
               "eager": every other layer, CUDA events (or perf_counter) around forward()
        row = slowest rank's median µs, next to the expert-stage roofline of `plan.predict` (GPU rows only):
              max(touched expert weight bytes / HBM TB/s, FLOPs / TFLOP/s), uniform routing

`--shared-stream` (`SHARED_MODES`): one row per mode and (comm, T). Ranks, modes, `--host`: docs/bench.md.

`epmoe bench layer --host` (`host_rows`), for T in tokens: the HF block | patched block | epmoe eager | graph:
    host us  = median wall time of the Python call (GPU queue drained between calls)
    gpu us   = median CUDA-event time of the same call (eager), or of a graph replay
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from epmoe.bench.core import bench, device_links, options_for, progress, random_inputs, rank_device, timed
from epmoe.bench.experts import random_weights
from epmoe.bench.generate import build_model, hf_config
from epmoe.bench.plan import Links, predict
from epmoe.comm import get_comm
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights
from epmoe.group import RankGroup, VirtualGroup
from epmoe.integrations.hf import HFMoEBlock, _family_of, capture_model_graphs, patch_model
from epmoe.launch import run_ranks
from epmoe.layer import MoELayer, SharedExperts
from epmoe.select import Combo, check, comm_candidates, pick_runner

# --shared-stream values: MoELayer(shared_stream=...) (None: the layer's default), or the two parts alone
SHARED_MODES = {"default": None, "on": True, "off": False, "routed": None, "shared": None}


def _roofline_us(cfg: MoEConfig, world: int, tokens: int, links: Links) -> float:
    """The routed experts' roofline (plan.predict) plus the shared experts' (every rank runs them
    on its own tokens: their bf16 weights once, 6 * T * H * S FLOPs)."""
    row = predict(cfg, world, tokens, "nccl_a2a" if world > 1 else "none", links)
    if not row:
        return float("nan")
    S, H = cfg.shared_width, cfg.hidden
    shared = max(3 * H * S * 2 / (links.hbm_tbps * 1e6), 6 * tokens * H * S / (links.tflops * 1e6)) if S else 0.0
    return float(row["experts_us"]) + shared


def _layers(cfg: MoEConfig, group: RankGroup | None, comms: list[str], runner: str, device: torch.device,
            dtype: torch.dtype, max_tokens: int, modes: tuple[str, ...] = ("default",)
            ) -> dict[tuple[str, str], MoELayer | SharedExperts]:
    """(comm, mode) -> one layer per comm backend and shared-stream mode over the same weights of
    this rank's experts ("routed": without shared experts; "shared": the shared experts alone)."""
    rank, local = (group.rank, cfg.num_experts // group.world) if group is not None else (0, cfg.num_experts)
    g = torch.Generator().manual_seed(1000 + rank)
    if device.type == "cuda":  # drawn on the GPU: the large presets take tens of GB
        weights = random_weights(cfg, local, device, seed=1000 + rank)
    else:
        weights = ExpertWeights.random(cfg, local, dtype=dtype, device=device, generator=g)
    # the same correction bias on every rank (routing must agree); shared experts as the model has them
    bias = torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(7)).to(device) * 0.1 \
        if cfg.uses_correction_bias else None
    shared = SharedExperts.random(cfg, dtype, device, g) if cfg.shared_experts else None
    out: dict[tuple[str, str], MoELayer | SharedExperts] = {}
    for c in comms:
        name, _, budget = c.partition(" sm")  # "symm_a2a sm8": symm_a2a with sm_budget=8 (bench_layer)
        opts = {"max_tokens_per_rank": max_tokens} | ({"sm_budget": int(budget)} if budget else {})
        kw = {"comm": name, "runner": runner, "correction_bias": bias,  # auto hands each candidate its options
              "comm_options": opts if name == "auto" else options_for(get_comm(name), **opts)}
        for m in modes:
            if m == "shared":
                out[c, m] = shared
            elif m == "routed":
                out[c, m] = MoELayer(cfg.replace(shared_experts=0), weights, group, **kw)
            else:
                out[c, m] = MoELayer(cfg, weights, group, shared=shared, shared_stream=SHARED_MODES[m], **kw)
    return out


def capturable(layer: MoELayer) -> bool:
    """Whether `capture_graphs` can: a CUDA device, real ranks, select.py allowing a graph for a backend."""
    if layer.runner.weights.device.type != "cuda" or (layer.group is not None and layer.group.virtual):
        return False
    return any(check(dataclasses.replace(layer.combo_for(name), graph=True))[0] for name in layer.comms)


def _time_layer(layer: MoELayer | SharedExperts, x: torch.Tensor, logits: torch.Tensor, iters: int,
                cfg: MoEConfig | None = None) -> tuple[float, str]:
    """(median µs, timing) of one forward: replays of the layer's own graph for T, else eager (the
    shared experts alone, of `cfg`: a graph of their call on a GPU)."""
    device = x.device
    if isinstance(layer, SharedExperts):
        graph = device.type == "cuda" and x.shape[0] > 0
        return bench(lambda: layer(x, cfg), device=device, warmup=2, iters=iters, graph=graph,
                     flush_l2=False), "graph" if graph else "eager"
    if capturable(layer) and x.shape[0] > 0:
        T = x.shape[0]
        layer.capture_graphs(T, buckets=[T])
        bucket = layer.graphs.stage(x, logits, None, T)  # the bucket's graph: route -> ... -> combine
        us = bench(bucket.graph.replay, device=device, warmup=2, iters=iters, flush_l2=False)
        bucket.comm.after_replay()  # a bounded wait that timed out in a replay raises here
        return us, "graph"
    return bench(lambda: layer(x, logits), device=device, warmup=2, iters=iters, flush_l2=False), "eager"


def layer_rank(group: RankGroup | None, cfg: MoEConfig, tokens: list[int], comms: list[str], runner: str,
               iters: int = 10, show_progress: bool = True, modes: tuple[str, ...] = ("default",)
               ) -> list[dict[str, Any]]:
    """Time every (comm, tokens) on this rank; rows carry the slowest rank's time."""
    world, rank = (group.world, group.rank) if group is not None else (1, 0)
    backend = torch.distributed.get_backend() if world > 1 else None
    device, dtype = rank_device(world)
    links, source = device_links(device)
    layers = _layers(cfg, group, comms, runner, device, dtype, max(tokens), modes)
    cases = [(c, m, t) for c in comms for m in modes for t in tokens]
    rows = []
    for comm, mode, t in progress(cases, "bench layer") if rank == 0 and show_progress else cases:
        layer = layers[comm, mode]
        x, logits = random_inputs(cfg, t, rank, device, dtype)
        if world > 1:
            group.barrier()
        us, timing = _time_layer(layer, x, logits, iters, cfg)
        if world > 1:
            us = float(group.all_gather(torch.tensor([us], device=device)).max())
        rows.append(_row(cfg, comm, runner, world, backend or "one", t, us, timing, links, source, modes, mode))
    return rows


def _row(cfg: MoEConfig, comm: str, runner: str, world: int, ranks: str, tokens: int, us: float, timing: str,
         links: Links | None, source: str, modes: tuple[str, ...] = ("default",), mode: str = "default"
         ) -> dict[str, Any]:
    row = {"comm": comm, "runner": runner, "world": world, "ranks": ranks, "tokens": tokens, "us": us, "timing": timing}
    if modes != ("default",):  # --shared-stream asked: which variant the row times
        row["shared_stream"] = mode
    if links is not None:  # a GPU: the roofline of its measured rates
        row.update(expert_roofline_us=_roofline_us(cfg, world, tokens, links), hbm_TBps=links.hbm_tbps,
                   TFLOPs=links.tflops)
    return {**row, "rates": source}


def _virtual_rows(cfg: MoEConfig, tokens: list[int], comms: list[str], runner: str, world: int,
                  iters: int, modes: tuple[str, ...] = ("default",)) -> list[dict[str, Any]]:
    """Virtual ranks on one GPU: a whole group step (all ranks' forwards, then a sync), wall clock."""
    device = torch.device("cuda:0")
    links, source = device_links(device)
    vg = VirtualGroup(world)
    layers = vg.run(lambda g: _layers(cfg, g, comms, runner, device, torch.bfloat16, max(tokens), modes))
    rows = []
    cases = [(c, m, t) for c in comms for m in modes for t in tokens]
    for comm, mode, t in progress(cases, f"bench layer (virtual x{world})"):
        inputs = [random_inputs(cfg, t, r, device, torch.bfloat16) for r in range(world)]

        def step(g: RankGroup, key: tuple[str, str] = (comm, mode), inputs: list = inputs) -> None:
            layer = layers[g.rank][key]
            if isinstance(layer, SharedExperts):
                layer(inputs[g.rank][0], cfg)
            else:
                layer(*inputs[g.rank])

        us = bench(lambda step=step: (vg.run(step), torch.cuda.synchronize()), "cpu", warmup=2, iters=iters)
        rows.append(_row(cfg, comm, runner, world, "virtual", t, us, "eager", links, source, modes, mode))
    return rows


def default_world() -> int:
    """`--world` when not given: one rank per GPU, 1 on the CPU."""
    return max(torch.cuda.device_count(), 1)


def bench_layer(preset: str | MoEConfig, tokens: list[int], comm: str = "all", runner: str = "auto",
                world: int | None = None, iters: int = 10, shared_stream: str | None = None,
                sm_budget: tuple[int | None, ...] = (None,)) -> list[dict[str, Any]]:
    """Rows (comm, runner, world, ranks, tokens, us, timing, [expert_roofline_us, hbm_TBps, TFLOPs on a GPU,]
    rates) per requested backend. More ranks than GPUs: virtual ranks on one GPU, else gloo processes.
    shared_stream: comma-separated `SHARED_MODES` (rows then carry `shared_stream`); sm_budget: a row per
    budget of each backend that takes one (comm "symm_a2a sm8"; None: its default grids)."""
    cfg = MoEConfig.from_preset(preset) if isinstance(preset, str) else preset
    modes = tuple(m for m in (shared_stream or "default").split(",") if m)
    if not modes or any(m not in SHARED_MODES for m in modes):
        raise ValueError(f"shared_stream takes comma-separated values of {', '.join(SHARED_MODES)}; "
                         f"got {shared_stream!r}")
    if "shared" in modes and not cfg.shared_experts:
        raise ValueError("shared_stream 'shared' times the shared experts alone; this config has none")
    world = default_world() if world is None else world
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    n_gpu = torch.cuda.device_count()
    device = "cuda" if n_gpu else "cpu"
    runner = pick_runner(device, "bf16") if runner == "auto" else runner
    if comm in ("all", "auto"):
        combo = Combo(runner=runner, layout="dp", world=world, device=device)
        names = ["none"] if world == 1 else [n for n in comm_candidates(combo) if n != "none"]
        auto = ["auto"] if len(names) > 1 else []
        comms = (auto or names) if comm == "auto" else names + auto  # auto alone (one rank: its only candidate)
    else:
        comms = comm.split(",")
    if not comms:
        raise ValueError(f"no registered comm backend serves the dp layout on {world} ranks with runner {runner!r}")
    budgeted = [c for c in comms if c != "auto" and options_for(get_comm(c), sm_budget=None)]
    comms = [c + ("" if b is None else f" sm{b}") for c in comms for b in (sm_budget if c in budgeted else (None,))]
    if world == 1:
        return layer_rank(None, cfg, tokens, comms, runner, iters, modes=modes)
    if n_gpu == 1:
        return _virtual_rows(cfg, tokens, comms, runner, world, iters, modes)
    return run_ranks(layer_rank, world, args=(cfg, tokens, comms, runner, iters, True, modes), timeout=1800,
                     backend="nccl" if n_gpu >= world else "gloo")[0]


# --- host time per call (`epmoe bench layer --host`) ---


def host_and_gpu_us(fn: Callable[[], Any], device: torch.device, iters: int = 50, warmup: int = 5
                    ) -> tuple[float, float]:
    """(median host µs of one call, median GPU µs of one call)."""
    for _ in range(warmup):
        fn()
    host, gpu = [], []

    def call() -> None:  # the host time of fn() alone, inside the CUDA events
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)

    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        gpu.append(timed(call, device)[0])
    return statistics.median(host), statistics.median(gpu) if device.type == "cuda" else float("nan")


def host_rows(preset: str, tokens: list[int], device: torch.device, iters: int = 50) -> list[dict[str, Any]]:
    """Host and GPU µs per call of the first MoE block of `preset`'s transformers model (random weights; on the
    CPU `bench.generate`'s scaled-down one): HF block, patched block, MoELayer eager; on a GPU also the layer's
    graph replay and the patched block with graphs captured on first use (`patch_model(graphs=...)`)."""
    import transformers

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dense = getattr(hf_config(preset, cpu=not cuda), "first_k_dense_replace", None) or 0
    config = hf_config(preset, layers=dense + 1, cpu=not cuda)  # the first MoE layer is the last one
    model = build_model(config, device, dtype)
    name, block = next((n, m) for n, m in model.named_modules() if _family_of(m) is not None)
    H = config.hidden_size
    gen = torch.Generator().manual_seed(0)
    xs = {T: torch.randn(1, T, H, generator=gen).to(device, dtype) for T in tokens}
    rows: list[dict[str, Any]] = []

    def add(impl: str, T: int, fn: Callable[[], Any]) -> None:
        h, g = host_and_gpu_us(fn, device, iters=iters)
        rows.append({"impl": impl, "tokens": T, "host_us": h, "gpu_us": g})

    with torch.no_grad():
        for T in tokens:
            add("hf block", T, lambda T=T: block(xs[T]))
        patch_model(model)
        patched = model.get_submodule(name)
        assert isinstance(patched, HFMoEBlock)
        layer, router = patched.moe, getattr(patched, patched.router_name)
        logits = {T: router(xs[T].reshape(T, H))[0].float() for T in tokens}
        for T in tokens:
            add("patched block", T, lambda T=T: patched(xs[T]))
            add("layer eager", T, lambda T=T: layer(xs[T].reshape(T, H), logits[T]))
        if cuda:
            layer.capture_graphs(max(tokens), buckets=sorted(set(tokens)), validate=False)
            for T in tokens:
                add("layer replay", T, lambda T=T: layer(xs[T].reshape(T, H), logits[T]))
            capture_model_graphs(model, max(tokens))
            for T in tokens:
                add("patched block graphs", T, lambda T=T: patched(xs[T]))
    for r in rows:
        r.update(preset=preset, transformers=transformers.__version__)
    return rows
