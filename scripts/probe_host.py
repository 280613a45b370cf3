"""Host vs GPU time of one MoE layer call (epmoe eager, epmoe graph replay, HF block, patched HF block).

    python scripts/probe_host.py [--preset qwen3-30b-a3b] [--tokens 1,16,128,1024,4096] [--out DIR]

Writes host.json (rows) and profile_T.txt (torch.profiler tables of one eager call) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--tokens", default="1,16,128,1024,4096")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import transformers

    from epmoe.bench.generate import hf_config
    from epmoe.bench.host import host_and_gpu_us, profile_table
    from epmoe.integrations.hf import patch_model

    device = torch.device("cuda")
    dtype = torch.bfloat16
    config = hf_config(args.preset, layers=1)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    block_name, block = next((n, m) for n, m in model.named_modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoE", "MLP")) and hasattr(m, "experts"))
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    H = config.hidden_size
    xs = {T: torch.randn(1, T, H, device=device, dtype=dtype) for T in tokens}
    with torch.no_grad():
        for T in tokens:
            h, g = host_and_gpu_us(lambda: block(xs[T]), device)
            rows.append({"impl": "hf block", "tokens": T, "host_us": h, "gpu_us": g})
        patch_model(model)
        pblock = model.get_submodule(block_name)
        layer = pblock.moe
        router = getattr(pblock, pblock.router_name)
        for T in tokens:
            x = xs[T].reshape(T, H)
            logits = router(x)[0].float()
            h, g = host_and_gpu_us(lambda: pblock(xs[T]), device)
            rows.append({"impl": "patched block", "tokens": T, "host_us": h, "gpu_us": g})
            h, g = host_and_gpu_us(lambda: layer(x, logits), device)
            rows.append({"impl": "layer eager", "tokens": T, "host_us": h, "gpu_us": g})
            with open(f"{args.out}/profile_{T}.txt", "w") as f:
                f.write(profile_table(lambda: layer(x, logits), device))
        layer.capture_graphs(max(tokens), buckets=tokens, validate=False)
        for T in tokens:
            x = xs[T].reshape(T, H)
            logits = router(x)[0].float()
            h, g = host_and_gpu_us(lambda: layer(x, logits), device)
            rows.append({"impl": "layer replay", "tokens": T, "host_us": h, "gpu_us": g})
    meta = {"preset": args.preset, "device": torch.cuda.get_device_name(device), "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "transformers": transformers.__version__}
    json.dump({"meta": meta, "rows": rows}, open(f"{args.out}/host.json", "w"), indent=1)
    print(f"{'impl':>14} {'T':>5} {'host us':>9} {'gpu us':>9}")
    for r in rows:
        print(f"{r['impl']:>14} {r['tokens']:>5} {r['host_us']:9.1f} {r['gpu_us']:9.1f}")


if __name__ == "__main__":
    main()
