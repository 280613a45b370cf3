"""`epmoe bench comm`: dispatch and combine alone, per backend, payload and token count.

    for backend, T:  build the backend for T (a pre-sized workspace holds exactly T tokens)
        no host sync in a call (symm_a2a; static allgather/nccl_a2a on real ranks), on the GPU:
            graphs gd = dispatch, gc = combine; [event; gd.replay(); event; gc.replay(); event] x iters,
            one sync at the end, then check() once (a timed-out wait raises there)
        otherwise (count exchanges, CPU):
            barrier; t0; dispatch(x, routing); t1; barrier; t0; combine(out, d); t1  (CUDA events or perf_counter)
    row = slowest rank's median µs per phase, bytes sent to other ranks (largest over ranks), GB/s of the
          round trip and of dispatch alone, that rate over the link bandwidth, and copied_bytes: the
          bytes a rank writes by staging copies in one call (dispatch + combine, largest over ranks;
          the handles' dispatch_copied / combine_copied: packing, unpacking, own chunks, casts)

Uniform routing, equal tokens per rank, no expert stage (combine reads zeros); bytes, virtual ranks: docs/bench.md.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from epmoe.bench.core import hbm_copy_gbps, options_for, random_inputs, rank_device, timed
from epmoe.bench.plan import Links
from epmoe.comm import COMM_BACKENDS, get_comm
from epmoe.comm.symmetric import SymmA2A
from epmoe.config import MoEConfig
from epmoe.group import EPGroup, Placement, RankGroup, VirtualGroup
from epmoe.launch import run_ranks
from epmoe.routing import Routing, route


def _inputs(cfg: MoEConfig, rank: int, T: int, device: torch.device, dtype: torch.dtype
            ) -> tuple[torch.Tensor, Routing]:
    """x [T, H] and uniform routing of one rank (the same on every path of the benchmark)."""
    x, logits = random_inputs(cfg, T, 1000 * rank + T, device, dtype)
    bias = torch.zeros(cfg.num_experts, device=device) if cfg.uses_correction_bias else None
    return x, route(logits, cfg, bias)


def sm_budgets(text: str | None) -> tuple[int | None, ...]:
    """`--sm-budget` values: comma-separated SM counts, "all" (None: symm_a2a's default grids)."""
    try:
        budgets = tuple(None if v == "all" else int(v) for v in (text or "all").split(",") if v)
    except ValueError:
        budgets = ()
    if not budgets or any(b is not None and b < 1 for b in budgets):
        raise ValueError(f"--sm-budget takes comma-separated SM counts >= 1 or 'all', e.g. 8,16,all; got {text!r}")
    return budgets


def _budget_label(budget: int | None) -> str:
    return "" if budget is None else f" sm{budget}"


def _options(cls: type, T: int, payload: str | None, static: bool, sm_budget: int | None = None) -> dict[str, Any]:
    """Options for a backend built for T tokens per rank (only those `cls` takes; None, False: the defaults)."""
    return options_for(cls, max_tokens_per_rank=max(T, 1), check_errors=False, payload=payload, static_shapes=static,
                       sm_budget=sm_budget)


def _graph_times(dispatch: Callable[[], Any], combine: Callable[[Any], Any], check: Callable[[], Any],
                 device: torch.device, warmup: int, iters: int, barrier: Callable[[], None]
                 ) -> tuple[list[float], list[float], Any]:
    """(dispatch µs, combine µs, the captured dispatch's result): each phase captured in a CUDA
    graph, replayed alternately with events between, no host sync until the end; then check()."""
    gd, gc = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(gd):
        d = dispatch()
    with torch.cuda.graph(gc):
        combine(d)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(3 * (warmup + iters))]
    barrier()
    for i in range(warmup + iters):
        events[3 * i].record()
        gd.replay()
        events[3 * i + 1].record()
        gc.replay()
        events[3 * i + 2].record()
    torch.cuda.synchronize(device)
    check()
    times = [[events[3 * i + j].elapsed_time(events[3 * i + j + 1]) * 1e3 for i in range(warmup, warmup + iters)]
             for j in (0, 1)]
    return times[0], times[1], d


def _row(name: str, payload: str, world: int, T: int, ranks: str, timing: str, table: list[list[float]],
         link: tuple[str, float] | None, one_gpu: bool) -> dict[str, Any]:
    """One result row from every rank's [dispatch µs, combine µs, dispatch bytes, combine bytes, copied bytes]."""
    disp_us, comb_us, disp_b, comb_b, copied = (max(r[i] for r in table) for i in range(5))
    if one_gpu:  # the GPU moved every rank's bytes in that time
        moved_d, moved = sum(r[2] for r in table), sum(r[2] + r[3] for r in table)
    else:
        moved_d, moved = disp_b, disp_b + comb_b
    gbps = moved / ((disp_us + comb_us) * 1e3) if disp_us + comb_us > 0 else 0.0
    # link_frac: one HBM read + one write per moved byte on one GPU
    frac = None if link is None else (2 * gbps if one_gpu else gbps) / link[1]
    return {"backend": name, "payload": payload, "world": world, "tokens": T, "ranks": ranks, "timing": timing,
            "dispatch_us": disp_us, "combine_us": comb_us, "dispatch_bytes": int(disp_b),
            "combine_bytes": int(comb_b), "bytes_per_rank": int(disp_b + comb_b), "copied_bytes": int(copied),
            "GB/s": gbps, "dispatch GB/s": moved_d / (disp_us * 1e3) if disp_us > 0 else 0.0,
            "link": f"{link[0]} {link[1]:.0f} GB/s" if link is not None else None, "link_frac": frac}


def _cuda_index(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def bench_comm(cfg: MoEConfig, backends: Sequence[str], tokens: Sequence[int], group: RankGroup | None = None,
               dtype: torch.dtype = torch.bfloat16, payload: str | None = None, iters: int = 20, warmup: int = 3,
               device: torch.device | str | None = None, link_gbps: float | None = None, link_name: str = "NVLink",
               static: bool = False, graphs: bool = True, symm_combine: Sequence[str] = ("push",),
               sm_budget: Sequence[int | None] = (None,)) -> list[dict[str, Any]]:
    """One row (`_row`'s columns) per (backend, tokens per rank), timed on this rank; every rank of `group`
    calls it alike. timing: "graph" (CUDA graph replays of host-sync-free backends on real GPU ranks when
    `graphs`), "events" (CUDA events, eager) or "cpu"; link_frac = GB/s / link_gbps. static: allgather/nccl_a2a
    with static_shapes. symm_combine: symm_a2a's combine modes, one row each ("symm_a2a" = push, "symm_a2a
    pull"); sm_budget: symm_a2a's SM budgets, one row each per mode ("symm_a2a sm8"; None: the default grids).
    Virtual ranks on a GPU: `bench_comm_virtual`."""
    world, rank = (group.world, group.rank) if group is not None else (1, 0)
    device = _cuda_index(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if iters <= 0 or warmup < 0:
        raise ValueError(f"need iters > 0 and warmup >= 0, got iters={iters}, warmup={warmup}")
    virtual = world > 1 and not isinstance(group, EPGroup)
    if virtual and device.type == "cuda" and "symm_a2a" in backends:
        raise ValueError("symm_a2a on virtual ranks of one GPU is timed by bench_comm_virtual (every rank's "
                         "send before any receive, from one thread)")
    ranks = ("threads" if virtual else getattr(group, "backend", "processes")) if world > 1 else "one"
    placement = Placement.contiguous(cfg.num_experts, world)
    link = (link_name, link_gbps) if link_gbps else None

    def barrier() -> None:
        if world > 1:
            group.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    variants = [(n, m, b) for n in backends for m in (symm_combine if n == "symm_a2a" else (None,))
                for b in (sm_budget if n == "symm_a2a" else (None,))]
    for name, mode, budget in variants:
        cls = get_comm(name)
        for T in tokens:
            opts = _options(cls, T, payload, static, budget) | ({} if mode is None else {"combine_mode": mode})
            backend = cls(cfg, group, placement, cls.make_options(**opts), device=device, dtype=dtype)
            x, routing = _inputs(cfg, rank, T, device, dtype)
            capturable = graphs and device.type == "cuda" and not virtual and not backend.needs_host_sync
            mine, timing = _time_backend(backend, x, routing, capturable, warmup, iters, barrier)
            table = group.all_gather(torch.tensor(mine, device=device)).tolist() if world > 1 else [mine]
            label = name + (" static" if static and cls.static_capable else "")
            label += (f" {mode}" if mode not in (None, "push") else "") + _budget_label(budget)
            rows.append(_row(label, _payload_name(payload, dtype), world, T, ranks, timing, table, link, False))
            if getattr(backend, "destroy", None) is not None:
                backend.destroy()  # collective: every rank is here
    return rows


def _time_backend(backend: Any, x: torch.Tensor, routing: Routing, capturable: bool, warmup: int, iters: int,
                  barrier: Callable[[], None]) -> tuple[list[float], str]:
    """([median dispatch µs, median combine µs, dispatch bytes, combine bytes, copied bytes], timing) on this
    rank."""
    device = x.device
    d = backend.dispatch(x, routing)  # every dispatch is paired with its combine
    expert_out = torch.zeros(d.num_pairs, x.shape[1], dtype=x.dtype, device=device)  # [M, H]
    backend.combine(expert_out, d)
    if capturable:
        for _ in range(warmup):  # eager warm-up: compiles kernels, settles allocations
            backend.combine(expert_out, backend.dispatch(x, routing))
        times_d, times_c, d = _graph_times(lambda: backend.dispatch(x, routing),
                                           lambda d: backend.combine(expert_out, d),
                                           backend.check, device, warmup, iters, barrier)
        timing = "graph"
    else:
        times = []
        for _ in range(warmup + iters):
            barrier()
            td, d = timed(lambda: backend.dispatch(x, routing), device)
            barrier()
            times.append((td, timed(lambda d=d: backend.combine(expert_out, d), device)[0]))
        times_d, times_c = zip(*times[warmup:])
        backend.check()
        timing = "events" if device.type == "cuda" else "cpu"
    h = d.handle
    return [statistics.median(times_d), statistics.median(times_c), float(getattr(h, "dispatch_bytes", 0)),
            float(getattr(h, "combine_bytes", 0)), float(copied_bytes(h))], timing


def copied_bytes(handle: Any) -> int:
    """Staging-copy bytes of one call (dispatch + combine) from its handle; 0 where it counts none
    (`none`)."""
    return getattr(handle, "dispatch_copied", 0) + getattr(handle, "combine_copied", 0)


def bench_comm_virtual(cfg: MoEConfig, world: int, tokens: Sequence[int], dtype: torch.dtype = torch.bfloat16,
                       payload: str | None = None, iters: int = 20, warmup: int = 3,
                       device: torch.device | str = "cuda", hbm_gbps: float | None = None,
                       combine_mode: str = "push", sm_budget: int | None = None) -> list[dict[str, Any]]:
    """symm_a2a on `world` virtual ranks of one GPU (its `sm_budget`), one row per token count: each phase of all
    ranks (every send, then every receive) is one CUDA graph, replayed as in `bench_comm`; GB/s is
    the GPU's total, rated against the HBM copy bandwidth (`hbm_gbps`, measured when not given)."""
    device = _cuda_index(device)
    if device.type != "cuda":
        raise ValueError("bench_comm_virtual times CUDA graphs: it needs a CUDA device")
    hbm_gbps = hbm_gbps or hbm_copy_gbps(device)
    placement = Placement.contiguous(cfg.num_experts, world)
    rows = []
    for T in tokens:
        options = SymmA2A.make_options(**_options(SymmA2A, T, payload, False, sm_budget), combine_mode=combine_mode)
        bs = VirtualGroup(world, timeout=600).run(
            lambda g, options=options: SymmA2A(cfg, g, placement, options, device=device, dtype=dtype))
        table = _time_virtual(bs, [_inputs(cfg, r, T, device, dtype) for r in range(world)], warmup, iters)
        label = f"symm_a2a (virtual x{world})" + (f" {combine_mode}" if combine_mode != "push" else "") \
            + _budget_label(sm_budget)
        rows.append(_row(label, _payload_name(payload, dtype), world, T, "virtual", "graph", table,
                         ("HBM copy", hbm_gbps), True))
        del bs  # no destroy(): its barrier is collective over the virtual ranks' threads, gone by now
        torch.cuda.empty_cache()
    return rows


def _time_virtual(bs: list[Any], inputs: list[tuple[torch.Tensor, Routing]], warmup: int, iters: int
                  ) -> list[list[float]]:
    """Per rank [dispatch µs, combine µs, dispatch bytes, combine bytes, copied bytes] of the symm_a2a backends
    `bs` of all virtual ranks, each phase of all ranks one CUDA graph."""
    world, device, H = len(bs), bs[0].device, bs[0].cfg.hidden
    M = world * bs[0].max_tokens * bs[0].slot_experts
    outs = [torch.zeros(M, H, dtype=x.dtype, device=device) for x, _ in inputs]  # [M, H] each

    def dispatch() -> list[Any]:  # every rank's send, then every receive
        for b, (x, r) in zip(bs, inputs):
            b.dispatch_send(x, r)
        return [b.dispatch_recv() for b in bs]

    def combine(ds: list[Any]) -> None:
        for b, out, d in zip(bs, outs, ds):
            b.combine_send(out, d)
        for b, d in zip(bs, ds):
            b.combine_recv(d)

    for _ in range(max(warmup, 1)):
        combine(dispatch())
    torch.cuda.synchronize(device)
    times_d, times_c, ds = _graph_times(dispatch, combine, lambda: [b.check() for b in bs], device, warmup,
                                        iters, lambda: None)
    med_d, med_c = statistics.median(times_d), statistics.median(times_c)
    return [[med_d, med_c, float(d.handle.dispatch_bytes), float(d.handle.combine_bytes),
             float(copied_bytes(d.handle))] for d in ds]


def _payload_name(payload: str | None, dtype: torch.dtype) -> str:
    """The wire format of a row: the quantized format, or the activation dtype as it is."""
    return str(dtype).removeprefix("torch.") if payload in (None, "bf16") else payload


def _bench_rank(group: RankGroup, cfg: MoEConfig, backends: list[str], tokens: list[int], payloads: list[str],
                iters: int, static: bool, symm_combine: tuple[str, ...] = ("push",),
                sm_budget: tuple[int | None, ...] = (None,)) -> list[dict[str, Any]]:
    """One process rank: its own GPU under NCCL (rated against the cost model's NVLink), else the CPU in fp32."""
    device, dtype = rank_device()
    return [r for p in payloads for r in bench_comm(cfg, backends, tokens, group, dtype, p, iters, device=device,
                                                    link_gbps=Links().nvlink_gbps if device.type == "cuda" else None,
                                                    static=static, symm_combine=symm_combine, sm_budget=sm_budget)]


def run_comm_bench(cfg: MoEConfig, world: int, tokens: list[int], backend: str = "all",
                   payloads: Sequence[str] = ("bf16",), iters: int = 20, static: bool = False,
                   symm_combine: tuple[str, ...] = ("push",), sm_budget: tuple[int | None, ...] = (None,)
                   ) -> list[dict[str, Any]]:
    """`epmoe bench comm` (backend: comma-separated names or "all"): rows of `bench_comm` on NCCL processes
    (one GPU each), virtual ranks on one GPU, else gloo processes. sm_budget: symm_a2a's (`sm_budgets`)."""
    if backend == "all":
        backends = [n for n, c in sorted(COMM_BACKENDS.items()) if "dp" in c.layouts and (n != "none" or world == 1)]
    else:
        backends = backend.split(",")
        for n in backends:
            get_comm(n)  # unknown names fail here with the list
    n_gpu = torch.cuda.device_count()
    if world == 1:
        dtype = torch.bfloat16 if n_gpu else torch.float32
        return [r for p in payloads for r in bench_comm(cfg, backends, tokens, None, dtype, p, iters, static=static,
                                                        device="cuda" if n_gpu else "cpu", symm_combine=symm_combine,
                                                        sm_budget=sm_budget)]
    if n_gpu != 1:
        return run_ranks(_bench_rank, world, args=(cfg, backends, tokens, payloads, iters, static, symm_combine,
                                                   sm_budget),
                         timeout=3600, backend="nccl" if n_gpu >= world else "gloo")[0]
    hbm, rows = hbm_copy_gbps("cuda:0"), []
    for p in payloads:
        for name in backends:
            if name == "symm_a2a":
                for mode in symm_combine:
                    for budget in sm_budget:
                        rows += bench_comm_virtual(cfg, world, tokens, torch.bfloat16, p, iters, hbm_gbps=hbm,
                                                   combine_mode=mode, sm_budget=budget)
                continue
            per_rank = VirtualGroup(world, timeout=600).run(
                lambda g, name=name, p=p: bench_comm(cfg, [name], tokens, g, torch.bfloat16, p, iters,
                                                     device="cuda:0", static=static))
            for r in per_rank[0]:  # host-thread exchanges: no link rate to compare with
                r.update(backend=f"{r['backend']} (virtual x{world})", ranks="virtual")
            rows += per_rank[0]
    return rows


def ladder_from_rows(rows: Sequence[dict[str, Any]]) -> tuple[int, list[tuple[int | None, str]]]:
    """(world, crossover ladder) from one `epmoe bench comm` run on real ranks: the shortest round trip wins
    each token count; a run of one winner is one rung up to its largest count, the last open:
    [(128, "symm_a2a"), (None, "nccl_a2a")]. Registered backend names only, the unquantized payload."""
    labels = sorted({r["backend"] for r in rows})
    rows = [r for r in rows if r["backend"] in COMM_BACKENDS]
    if not rows:
        raise ValueError(f"no rows of registered backends to take crossovers from (rows: {', '.join(labels)}; "
                         "static-shape and pull variants are configurations, not backends comm='auto' picks: "
                         "time without --static)")
    if any(r.get("ranks") in ("virtual", "threads") for r in rows):
        raise ValueError("crossovers come from real ranks (one GPU per process); virtual ranks on one GPU "
                         "measure HBM, not links")
    worlds = {r["world"] for r in rows}
    if len(worlds) != 1:
        raise ValueError(f"rows of one world size only, got {sorted(worlds)}")
    payloads = list(dict.fromkeys(r["payload"] for r in rows))
    payload = ([p for p in payloads if p in ("bfloat16", "float16", "float32")] or payloads)[0]
    best: dict[int, tuple[float, str]] = {}
    for r in rows:
        t = r["dispatch_us"] + r["combine_us"]
        if r["payload"] == payload and (r["tokens"] not in best or t < best[r["tokens"]][0]):
            best[r["tokens"]] = (t, r["backend"])
    ladder: list[tuple[int | None, str]] = []
    for tokens in sorted(best):
        name = best[tokens][1]
        if ladder and ladder[-1][1] == name:
            ladder[-1] = (tokens, name)
        else:
            ladder.append((tokens, name))
    ladder[-1] = (None, ladder[-1][1])
    return worlds.pop(), ladder
