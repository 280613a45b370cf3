"""`epmoe bench comm`: dispatch and combine alone, per backend, payload and token count.

    for backend, T:   barrier; t0; dispatch(x, routing); t1        (CUDA events, or perf_counter)
                      barrier; t0; combine(out, dispatched); t1
    row = slowest rank's median µs of each phase, bytes this rank sent to other ranks, GB/s,
          and that rate as a fraction of the link bandwidth (when one is given)

Routing is uniform (random router logits through `route`), tokens per rank equal on every
rank, the expert stage is skipped (combine reads a zero tensor of the runner's output shape),
so the rows isolate the communication. Bytes count what leaves the rank (rows to itself are
free): allgather sends (W - 1) * T rows each way, nccl_a2a one row per (token, other rank hit).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from epmoe.comm import COMM_BACKENDS, accepted_options, get_comm
from epmoe.config import MoEConfig
from epmoe.group import Placement, RankGroup, VirtualGroup
from epmoe.routing import route


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(µs, result) of one call; on the GPU from CUDA events around it."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3, result
    t0 = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t0) * 1e6, result


def bench_comm(
    cfg: MoEConfig,
    backends: Sequence[str],
    tokens: Sequence[int],
    group: RankGroup | None = None,
    dtype: torch.dtype = torch.bfloat16,
    payload: str | None = None,
    iters: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
    link_gbps: float | None = None,
) -> list[dict[str, Any]]:
    """Time dispatch and combine of each backend at each token count (per rank) on this rank.

    Every rank of `group` must call it with the same arguments. Returns one row per (backend,
    tokens): backend, payload, world, tokens, dispatch_us, combine_us (slowest rank's median),
    dispatch_bytes, combine_bytes, bytes_per_rank (largest over ranks), GB/s (bytes_per_rank
    over dispatch + combine time) and link_frac (GB/s / link_gbps, None without link_gbps).
    """
    world = group.world if group is not None else 1
    rank = group.rank if group is not None else 0
    if device is None:
        device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if iters <= 0 or warmup < 0:
        raise ValueError(f"need iters > 0 and warmup >= 0, got iters={iters}, warmup={warmup}")
    placement = Placement.contiguous(cfg.num_experts, world)

    def barrier() -> None:
        if world > 1:
            group.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for name in backends:
        cls = get_comm(name)
        wanted = {"max_tokens_per_rank": max(max(tokens), 1), "payload": payload}
        opts = accepted_options(cls, {k: v for k, v in wanted.items() if v is not None})
        backend = cls(cfg, group, placement, **opts)
        for T in tokens:
            g = torch.Generator().manual_seed(1000 * rank + T)
            x = torch.randn(T, cfg.hidden, generator=g).to(device, dtype)
            bias = torch.zeros(cfg.num_experts, device=device) if cfg.uses_correction_bias else None
            routing = route(torch.randn(T, cfg.num_experts, generator=g).to(device), cfg, bias)
            d = backend.dispatch(x, routing)  # every dispatch is paired with its combine
            expert_out = torch.zeros(d.num_pairs, cfg.hidden, dtype=dtype, device=device)  # [M, H]
            backend.combine(expert_out, d)
            times_d, times_c = [], []
            for i in range(warmup + iters):
                barrier()
                td, d = _timed(lambda: backend.dispatch(x, routing), device)  # noqa: B023
                barrier()
                tc, _ = _timed(lambda: backend.combine(expert_out, d), device)  # noqa: B023
                if i >= warmup:
                    times_d.append(td)
                    times_c.append(tc)
            h = d.handle
            mine = [statistics.median(times_d), statistics.median(times_c),
                     float(getattr(h, "dispatch_bytes", 0)), float(getattr(h, "combine_bytes", 0))]
            table = group.all_gather(torch.tensor(mine, device=device)).tolist() if world > 1 else [mine]
            disp_us, comb_us, disp_b, comb_b = (max(r[i] for r in table) for i in range(4))
            total = disp_b + comb_b
            gbps = total / ((disp_us + comb_us) * 1e3) if disp_us + comb_us > 0 else 0.0
            rows.append({
                "backend": name, "payload": _payload_name(payload, dtype), "world": world, "tokens": T,
                "dispatch_us": disp_us, "combine_us": comb_us,
                "dispatch_bytes": int(disp_b), "combine_bytes": int(comb_b), "bytes_per_rank": int(total),
                "GB/s": gbps, "link_frac": gbps / link_gbps if link_gbps else None,
            })
    return rows


def _payload_name(payload: str | None, dtype: torch.dtype) -> str:
    """The wire format of a row: the quantized format, or the activation dtype as it is."""
    if payload in (None, "bf16"):
        return str(dtype).removeprefix("torch.")
    return payload


def _bench_rank(group: RankGroup, cfg: MoEConfig, backends: list[str], tokens: list[int],
                payloads: list[str], iters: int) -> list[dict[str, Any]]:
    """One process rank: its own GPU under NCCL, else the CPU in fp32."""
    on_gpu = torch.cuda.is_available() and torch.distributed.get_backend() == "nccl"
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    link = _link_gbps() if on_gpu else None
    return [r for p in payloads
            for r in bench_comm(cfg, backends, tokens, group, dtype, p, iters, device=device, link_gbps=link)]


def _link_gbps() -> float:
    """The per-GPU NVLink bandwidth assumed by the cost model (epmoe.bench.plan.Links)."""
    from epmoe.bench.plan import Links

    return Links().nvlink_gbps


def run_comm_bench(args: Any) -> list[dict[str, Any]]:
    """`epmoe bench comm` (args: preset, tokens, backend, world, payload): rows of `bench_comm`.

    Ranks are NCCL processes with one GPU each when there are enough GPUs, virtual ranks on one
    GPU (threads sharing it: an upper bound on what NVLink would give, not a link measurement),
    else gloo processes on the CPU. Multi-node: launch the same rows under torchrun with
    `bench_comm(cfg, ..., group=EPGroup())` on every rank.
    """
    from epmoe.launch import run_ranks

    cfg = MoEConfig.from_preset(args.preset)
    world = args.world or 2
    tokens = [int(t) for t in str(args.tokens).split(",") if t]
    payloads = [p for p in str(args.payload).split(",") if p]
    if args.backend == "all":
        backends = [n for n, c in sorted(COMM_BACKENDS.items()) if "dp" in c.layouts and (n != "none" or world == 1)]
    else:
        backends = args.backend.split(",")
        for n in backends:
            get_comm(n)  # unknown names fail here with the list
    iters = getattr(args, "iters", None) or 20
    n_gpu = torch.cuda.device_count()
    if world == 1:
        device = "cuda" if n_gpu else "cpu"
        dtype = torch.bfloat16 if n_gpu else torch.float32
        return [r for p in payloads for r in bench_comm(cfg, backends, tokens, None, dtype, p, iters, device=device)]
    if n_gpu == 1:
        per_rank = VirtualGroup(world, timeout=600).run(
            lambda g: [r for p in payloads
                       for r in bench_comm(cfg, backends, tokens, g, torch.bfloat16, p, iters, device="cuda:0")])
        rows = per_rank[0]
        for r in rows:
            r["backend"] = f"{r['backend']} (virtual x{world})"
        return rows
    per_rank = run_ranks(_bench_rank, world, args=(cfg, backends, tokens, payloads, iters), timeout=3600,
                         backend="nccl" if n_gpu >= world else "gloo")
    return per_rank[0]
