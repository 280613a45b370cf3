"""Where one eager MoE layer call spends its host time: torch.profiler and cProfile tables.

    python scripts/profile_host.py [--preset qwen3-30b-a3b] [--tokens 1,128] [--out DIR]

Builds the preset's first MoE block (random weights, like `epmoe bench layer --host`), patches it
and profiles the bare `MoELayer(x, logits)` call and the patched block, one table per token count.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats

import torch

from epmoe.bench.generate import build_model, hf_config
from epmoe.bench.host import profile_table
from epmoe.integrations.hf import _family_of, patch_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--tokens", default="1,128")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = getattr(hf_config(a.preset, cpu=device.type != "cuda"), "first_k_dense_replace", None) or 0
    config = hf_config(a.preset, layers=dense + 1, cpu=device.type != "cuda")
    model = build_model(config, device, dtype)
    name = next(n for n, m in model.named_modules() if _family_of(m) is not None)
    patch_model(model)
    block = model.get_submodule(name)
    layer, router = block.moe, getattr(block, block.router_name)
    H = config.hidden_size
    stage_rows = []
    for T in (int(t) for t in a.tokens.split(",")):
        x = torch.randn(T, H, device=device, dtype=dtype)
        with torch.no_grad():
            logits = router(x)[0].float()
            calls = {"layer": lambda: layer(x, logits), "block": lambda: block(x[None])}
            for what, fn in calls.items():
                for _ in range(20):
                    fn()
                text = profile_table(fn, device)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(200):
                    fn()
                prof.disable()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(45)
                s2 = io.StringIO()
                pstats.Stats(prof, stream=s2).sort_stats("cumulative").print_stats(45)
                path = os.path.join(a.out, f"profile_{what}_T{T}.txt")
                with open(path, "w") as f:
                    f.write(f"{a.preset} {what} T={T} ({device})\n\n== torch.profiler (10 calls)\n{text}\n"
                            f"== cProfile 200 calls by tottime\n{s.getvalue()}\n== by cumulative\n{s2.getvalue()}")
                print("wrote", path)
            # host us of each stage alone (GPU drained first), the same call's pieces
            from epmoe.bench.host import host_and_gpu_us
            from epmoe.routing import route
            cfg = layer.cfg
            routing = route(logits, cfg, layer.correction_bias, check_values=False)
            d = layer._comm.dispatch(x, routing, max_tokens=T)
            out = layer.runner(d)
            stages = {
                "check_inputs": lambda: layer._check_inputs(x, logits, None),
                "route": lambda: route(logits, cfg, layer.correction_bias, check_values=False),
                "dispatch": lambda: layer._comm.dispatch(x, routing, max_tokens=T),
                "runner": lambda: layer.runner(d),
                "combine": lambda: layer._comm.combine(out, d),
                "layer": lambda: layer(x, logits),
                "torch.empty x4": lambda: [torch.empty(T, H, device=device, dtype=dtype) for _ in range(4)],
            }
            for what, fn in stages.items():
                h, g = host_and_gpu_us(fn, device, iters=100)
                stage_rows.append(f"T={T:5d} {what:16s} host {h:8.1f} us  gpu {g:8.1f} us")
                print(stage_rows[-1])
    with open(os.path.join(a.out, "stages.txt"), "w") as f:
        f.write("\n".join(stage_rows) + "\n")


if __name__ == "__main__":
    main()
