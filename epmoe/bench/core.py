"""The one benchmark helper every `epmoe bench` command uses, and its output (table, JSON, plot).

`bench(fn)` times a callable: warm-up, then either CUDA-graph replay (no launch overhead, the
way a serving engine runs decode) or CUDA events around eager calls, with an L2 flush between
iterations on the GPU so each iteration reads weights from HBM; `time.perf_counter` on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from epmoe.bench.plan import Links

_L2_FLUSH: dict[torch.device, torch.Tensor] = {}  # per device, 256 MiB: larger than any Hopper L2 (50-60 MB)


def bench(fn: Callable[[], Any], device: torch.device | str = "cpu", warmup: int = 3, iters: int = 20,
          graph: bool = False, flush_l2: bool = True) -> float:
    """Median time of fn() in microseconds. graph=True captures fn once in a CUDA graph and times
    replays (fn must be capturable); on the CPU: perf_counter, `graph`/`flush_l2` ignored."""
    device, run = torch.device(device), fn
    cuda = device.type == "cuda"
    if graph and cuda:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    for _ in range(warmup):
        run()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        if flush_l2 and cuda:
            if device not in _L2_FLUSH:
                _L2_FLUSH[device] = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device=device)
            _L2_FLUSH[device].zero_()
        times.append(timed(run, device)[0])
    return statistics.median(times)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(µs, result) of one call fn(): CUDA events around it on the GPU, perf_counter on the CPU."""
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


def matmul_tflops(device: torch.device | str, n: int = 8192, iters: int = 10) -> float:
    """Dense bf16 matmul rate of `device` (TFLOP/s): the median time of an n x n x n GEMM."""
    a, b, c = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(3))
    us = bench(lambda: torch.mm(a, b, out=c), device=device, warmup=3, iters=iters, flush_l2=False)
    return 2 * n**3 / (us * 1e-6) / 1e12


def hbm_copy_gbps(device: torch.device | str, nbytes: int = 1 << 30, iters: int = 5) -> float:
    """HBM bandwidth of a device-to-device copy of `nbytes`, counting read + write bytes (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = bench(partial(dst.copy_, src), device=device, warmup=1, iters=iters, flush_l2=False)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (us * 1e-6) / 1e9


def rank_device(world: int = 2) -> tuple[torch.device, torch.dtype]:
    """This process rank's (device, dtype): its GPU in bf16 under NCCL (or alone on a GPU), else the CPU in fp32."""
    if torch.cuda.is_available() and (world == 1 or torch.distributed.get_backend() == "nccl"):
        return torch.device(f"cuda:{torch.cuda.current_device()}"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def device_links(device: torch.device) -> tuple[Links | None, str]:
    """The cost model's rates measured on a GPU (a 1 GiB copy, an 8192^3 GEMM); None on the CPU."""
    if device.type != "cuda":
        return None, "timed on the CPU: no roofline (the cost model's rates are a GPU's)"
    return Links(hbm_tbps=hbm_copy_gbps(device) / 1e3, tflops=matmul_tflops(device)), "measured on this GPU"


def options_for(cls: type, **wanted: Any) -> dict[str, Any]:
    """The options of `wanted` that the comm backend `cls` takes (fields of cls.Options)."""
    names = {f.name for f in dataclasses.fields(cls.Options)}
    return {k: v for k, v in wanted.items() if k in names}


def random_inputs(cfg: Any, tokens: int, seed: int, device: torch.device | str, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] in `dtype` and router logits [T, E] fp32, drawn on the CPU from `seed`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cfg.hidden, generator=g).to(device, dtype)
    return x, torch.randn(tokens, cfg.num_experts, generator=g).to(device)


def progress(items: Sequence[Any], desc: str) -> Iterable[Any]:
    """A progress bar on stderr (tqdm when installed, else a plain counter)."""
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, file=sys.stderr, leave=False)
    except ImportError:  # tqdm is in the bench extra
        return items


def format_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A fixed-width text table (also valid Markdown)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cell = lambda v: (f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}") if isinstance(v, float) else str(v)  # noqa: E731
    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    width = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, width)) + " |"  # noqa: E731
    return "\n".join([line(columns), "|" + "|".join("-" * (w + 2) for w in width) + "|", *(line(b) for b in body)])


def write_json(rows: list[dict[str, Any]], path: str | Path, meta: dict[str, Any]) -> None:
    """{"meta": meta, "rows": rows} as JSON (what `epmoe plan --measured` reads)."""
    Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))


def plot_time_vs_tokens(rows: list[dict[str, Any]], path: str | Path, series: str | Callable[[dict], Any],
                        x: str = "tokens", y: str = "us", title: str = "", roofline: dict[int, float] | None = None,
                        ylabel: str | None = None) -> None:
    """A log-log PNG of `y` against `x`, one line per value of `series` (a column, or a function of
    the row) + an optional roofline. Points without a positive `x` or a positive finite `y` are left
    out; rows without `y` at all are a ValueError naming the columns they have."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows and not any(y in r for r in rows):
        raise ValueError(f"no {y!r} column to plot; the rows have {', '.join(rows[0])}")
    key = series if callable(series) else (lambda r: r[series])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for name in dict.fromkeys(key(r) for r in rows):
        pts = sorted((r[x], float(r[y])) for r in rows
                     if key(r) == name and isinstance(r.get(y), (int, float)) and 0 < r[y] < float("inf")
                     and r[x] > 0)  # log axes: 0 tokens has no place on them
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name))
        plotted += len(pts)
    if roofline:
        pts = sorted(roofline.items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="roofline")
    if plotted:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
    else:  # log axes of no data fail in matplotlib
        ax.text(0.5, 0.5, f"no positive {y} to plot", ha="center", transform=ax.transAxes)
    ax.set(xlabel=x, ylabel=ylabel or y, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def emit(rows: list[dict[str, Any]], args: Any, meta: dict[str, Any], series: str | Callable[[dict], Any],
         title: str, columns: Sequence[str] | None = None, **plot: Any) -> None:
    """Print the rows as a table; write `args.json` and the `args.plot` PNG (`plot`: x, y, ylabel)
    when asked. A roofline is drawn only where rows carry one (a GPU's rates, never CPU timings)."""
    print(format_table(rows, columns))
    if args.json:
        write_json(rows, args.json, meta)
        print(f"wrote {args.json}")
    if args.plot:
        plot.setdefault("ylabel", "µs")
        roof = {r["tokens"]: r["expert_roofline_us"] for r in rows if r.get("expert_roofline_us")} or None
        plot_time_vs_tokens(rows, args.plot, series=series, title=title, roofline=roof, **plot)
        print(f"wrote {args.plot}")


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's with its thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
