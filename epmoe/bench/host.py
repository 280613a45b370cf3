"""Host cost of one layer call: what the CPU spends per `MoELayer` call, next to the GPU time.

    host us  = median wall time of the Python call itself (no synchronisation inside the timed
               region; the GPU queue is drained between calls so a full queue never blocks a launch)
    gpu us   = median CUDA-event time of the same call (eager), or of a graph replay
    for T in tokens:  epmoe eager call | epmoe graph replay | the HF block (when transformers has the
                      preset's family), same weights, same x

Eager host time is what a model feels when its layers are called from Python: a layer whose host
time exceeds its GPU time leaves the GPU idle between launches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def host_and_gpu_us(fn: Callable[[], Any], device: torch.device, iters: int = 50, warmup: int = 5
                    ) -> tuple[float, float]:
    """(median host µs of one call, median GPU µs of one call)."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    host, gpu = [], []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        if cuda:
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) * 1e3)
    return statistics.median(host), (statistics.median(gpu) if gpu else float("nan"))


def profile_table(fn: Callable[[], Any], device: torch.device, rows: int = 40) -> str:
    """torch.profiler's table of one call's host-side ops, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(10):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
