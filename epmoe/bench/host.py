"""Host cost of one layer call: what the CPU spends per `MoELayer` call, next to the GPU time.

    host us  = median wall time of the Python call itself (no synchronisation inside the timed
               region; the GPU queue is drained between calls so a full queue never blocks a launch)
    gpu us   = median CUDA-event time of the same call (eager), or of a graph replay
    for T in tokens:  epmoe eager call | epmoe graph replay | the HF block (when transformers has the
                      preset's family), same weights, same x
(Why host time matters: docs/bench.md.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from epmoe.bench.generate import build_model, hf_config
from epmoe.integrations.hf import HFMoEBlock, _family_of, patch_model


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


def host_rows(preset: str, tokens: list[int], device: torch.device, iters: int = 50) -> list[dict[str, Any]]:
    """Host and GPU µs per call of one MoE block of `preset`'s transformers model (one decoder
    layer, random weights; full size on a GPU, `bench.generate`'s scaled-down model on the CPU):
    the HF block, the same block patched with epmoe, the bare MoELayer eager and (on a GPU) its
    graph replay, at each token count."""
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
    for r in rows:
        r.update(preset=preset, transformers=transformers.__version__)
    return rows
