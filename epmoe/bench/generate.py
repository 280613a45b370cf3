"""`epmoe bench generate`: Hugging Face `generate()` of a preset's model, HF's experts vs epmoe's.

    model  = the preset's published config, random weights (full size on a GPU, `--layers` cuts its
             depth; scaled down on the CPU)
    for mode in eager, static (cache_implementation="static": transformers compiles the decode step):
        hf      = the model as transformers runs it (experts_implementation="grouped_mm")
        epmoe   = the same weights with every MoE block patched (`patch_model`)
        epmoe graphs = the same, calls of up to --graphs tokens replaying CUDA graphs captured on first use
        for batch B: prompt of P random tokens, N new tokens (greedy, no early stop)
            prefill tok/s = B * P / time(generate(max_new_tokens=1))
            decode tok/s  = B * (N - 1) / (time(generate(max_new_tokens=N)) - prefill time)
    agreement = share of greedy tokens equal between hf and epmoe (a report, not a pass/fail)

One model per run: hf rows first, then its blocks patched in place (docs/bench.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import torch

from epmoe.bench.core import device_name, emit, progress
from epmoe.integrations.hf import capture_model_graphs, patch_model

# The published configs of the presets' models (transformers class, its arguments). Only the
# families `patch_model` supports; MiniMax has no transformers class in the versions we support.
HF_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6)),
    "qwen3-235b-a22b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, rope_theta=1e6)),
    "mixtral-8x7b": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rope_theta=1e6)),
    "olmoe-1b-7b": ("OlmoeConfig", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        max_position_embeddings=4096)),
    "gpt-oss-120b": ("GptOssConfig", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
        max_position_embeddings=131072)),
    "deepseek-v3": ("DeepseekV3Config", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
        routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=163840)),
}
# The CPU model: every width scaled down so one run takes seconds on two cores.
CPU_SCALE = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=512, num_hidden_layers=2, kv_lora_rank=32,
                 q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, n_group=4, topk_group=2,
                 first_k_dense_replace=1)
CPU_EXPERTS = 16
MODES = ("eager", "static")


def hf_config(preset: str, layers: int | None = None, cpu: bool = False) -> Any:
    """The transformers config of `preset`'s model (scaled down when `cpu`), `layers` deep."""
    import transformers

    if preset not in HF_MODELS:
        raise ValueError(f"bench generate has no model for preset {preset!r}; choose one of {', '.join(HF_MODELS)}")
    cls_name, kwargs = HF_MODELS[preset]
    cls = getattr(transformers, cls_name)
    kwargs = dict(kwargs)
    if cpu:
        scale = {k: v for k, v in CPU_SCALE.items() if k in kwargs or k == "num_hidden_layers"}
        if cls_name == "GptOssConfig":
            scale["intermediate_size"] = scale["hidden_size"] = 128
        kwargs.update(scale)
        kwargs.update({k: CPU_EXPERTS for k in ("num_experts", "num_local_experts", "n_routed_experts") if k in kwargs})
    if layers is not None:
        if layers <= 0:
            raise ValueError(f"--layers must be positive, got {layers}")
        kwargs["num_hidden_layers"] = layers
    if cls_name == "GptOssConfig":
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                 for i in range(kwargs["num_hidden_layers"])]
    return cls(**kwargs, experts_implementation="grouped_mm" if not cpu else "eager")


def build_model(config: Any, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A causal LM of `config` with random weights, on `device` in `dtype`, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


@dataclasses.dataclass
class GenerateTiming:
    """One (model, mode, batch) measurement."""

    prefill_s: float
    total_s: float
    tokens: torch.Tensor  # [B, N] generated ids


def time_generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, mode: str,
                  warmup: int = 1, reps: int = 3) -> GenerateTiming:
    """Wall time of a prefill-only generate and of a full one (greedy, exactly `new_tokens`): the
    fastest of `reps` alternating runs of each, after `warmup` full runs."""
    extra = {"cache_implementation": "static"} if mode == "static" else {}
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else lambda _: None

    def run(n: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                                  min_new_tokens=n, **extra)

    for _ in range(warmup):  # compilation, autotuning, allocator warm-up
        run(new_tokens)
    best = {1: float("inf"), new_tokens: float("inf")}  # prefill, total
    for _ in range(reps):
        for n in (1, new_tokens):
            sync(prompt.device)
            t0 = time.perf_counter()
            out = run(n)
            sync(prompt.device)
            best[n] = min(best[n], time.perf_counter() - t0)
    return GenerateTiming(best[1], best[new_tokens], out[:, prompt.shape[1]:].cpu())


def run_generate(preset: str, batches: list[int], prompt_len: int, new_tokens: int, modes: list[str],
                 layers: int | None, device: torch.device, dtype: torch.dtype, patch_kwargs: dict[str, Any],
                 graphs: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of (model, mode, batch): prefill and decode tokens/s; meta of the run. graphs > 0: the
    patched model is timed again with its layers' calls of up to this many tokens replaying CUDA
    graphs captured on first use (impl "epmoe graphs")."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    cpu = device.type != "cuda"
    config = hf_config(preset, layers, cpu=cpu)
    model = build_model(config, device, dtype)
    prompts = {b: torch.randint(0, config.vocab_size, (b, prompt_len), generator=torch.Generator().manual_seed(b)
                                ).to(device) for b in batches}
    rows: list[dict[str, Any]] = []
    tokens: dict[tuple[str, int], torch.Tensor] = {}
    for impl in ("hf", "epmoe") + (("epmoe graphs",) if graphs else ()):
        if impl == "epmoe":
            patch_model(model, **patch_kwargs)
        if impl == "epmoe graphs":
            capture_model_graphs(model, graphs)
        for mode, b in progress([(m, b) for m in modes for b in batches], desc=f"generate {impl}"):
            torch._dynamo.reset()
            t = time_generate(model, prompts[b], new_tokens, mode)
            decode_s = max(t.total_s - t.prefill_s, 1e-9)
            row = {"impl": impl, "mode": mode, "batch": b, "prompt": prompt_len, "new": new_tokens,
                   "prefill_tok_s": b * prompt_len / t.prefill_s,
                   "decode_tok_s": b * (new_tokens - 1) / decode_s if new_tokens > 1 else float("nan")}
            if impl != "hf":
                ref = tokens.get((mode, b))
                row["agree"] = float((ref == t.tokens).float().mean()) if ref is not None else float("nan")
                base = next(r for r in rows if r["impl"] == "hf" and r["mode"] == mode and r["batch"] == b)
                row["prefill_x"] = row["prefill_tok_s"] / base["prefill_tok_s"]
                row["decode_x"] = row["decode_tok_s"] / base["decode_tok_s"] if new_tokens > 1 else float("nan")
            else:
                tokens[(mode, b)] = t.tokens
            rows.append(row)
    meta = {"command": "bench generate", "preset": preset, "device": device_name(device), "dtype": str(dtype),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "scaled_down": cpu,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    return rows, meta


def main(args: argparse.Namespace) -> int:
    """`epmoe bench generate` (arguments from epmoe/cli.py: preset, batch, prompt, new, mode, layers, json, plot)."""
    cpu = not torch.cuda.is_available()
    device, dtype = torch.device("cpu" if cpu else "cuda"), torch.float32 if cpu else torch.bfloat16
    if cpu:
        print("bench generate on the CPU: a scaled-down model (widths in epmoe/bench/generate.py CPU_SCALE); "
              "the full-size comparison needs a GPU")
    prompt, new = args.prompt or (16 if cpu else 512), args.new or (4 if cpu else 32)
    if new < 2 or prompt < 1:
        raise SystemExit(f"bench generate: --new must be >= 2 (decode is timed from the second token) and --prompt "
                         f">= 1, got --new {new} --prompt {prompt}")
    batches = [int(b) for b in args.batch.split(",")]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if args.preset not in HF_MODELS:
        raise SystemExit(f"bench generate: no transformers model for preset {args.preset!r}; choose one of "
                         f"{', '.join(HF_MODELS)}")
    graphs = 0 if cpu else args.graphs
    rows, meta = run_generate(args.preset, batches, prompt, new, modes, args.layers, device, dtype, {}, graphs)
    emit(rows, args, meta, series=lambda r: f"{r['impl']} {r['mode']}", x="batch", y="decode_tok_s",
         ylabel="decode_tok_s", title=f"generate decode tokens/s, {args.preset} ({meta['device']})",
         columns=list(dict.fromkeys(k for r in rows for k in r)))
    return 0
