"""The layer under torch.compile: one custom op (epmoe::moe_forward), no graph break, no recompile per
token count, outputs equal to eager. CPU here (reference runner); the Triton paths on the GPU."""

from __future__ import annotations

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Routing
from epmoe.ops.moe import moe_forward

transformers = pytest.importorskip("transformers")


def _layer(device: str = "cpu", runner: str = "auto", preset: str = "qwen3-30b-a3b") -> MoELayer:
    cfg = MoEConfig.from_preset(preset).scaled(hidden=64, intermediate=32, num_experts=8)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = ExpertWeights.random(cfg, cfg.num_experts, dtype=dtype, device=device, generator=g)
    return MoELayer(cfg, w, runner=runner)


def _inputs(layer: MoELayer, T: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(T, layer.cfg.hidden, generator=g).to(device, dtype)
    logits = torch.randn(T, layer.cfg.num_experts, generator=g).to(device)
    return x, logits


def test_opcheck_logits_and_routed_modes():
    layer = _layer()
    x, logits = _inputs(layer, 5)
    torch.library.opcheck(moe_forward, (x, logits, None, None, layer.op_id))
    ids = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(t))[:2] for t in range(5)])
    routing = Routing.external(ids, torch.full((5, 2), 0.5), 8)
    cfg = layer.cfg
    routed = MoELayer(cfg.replace(top_k=2), layer.runner.weights)
    torch.library.opcheck(moe_forward, (x, None, routing.ids, routing.weights, routed.op_id))


@pytest.mark.parametrize("T", [0, 1, 7])
def test_compiled_layer_fullgraph_equals_eager(T):
    layer = _layer()
    x, logits = _inputs(layer, T)
    eager = layer(x, logits)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, logits), eager, rtol=0, atol=0)


def test_inductor_compiled_layer_equals_eager():
    layer = _layer()
    x, logits = _inputs(layer, 7)
    compiled = torch.compile(layer, fullgraph=True)  # inductor: the C++ CPU code around the op
    torch.testing.assert_close(compiled(x, logits), layer(x, logits), rtol=0, atol=0)


def test_compiled_layer_does_not_recompile_per_token_count():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = _layer()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (3, 5, 9, 17):
        x, logits = _inputs(layer, T)
        torch.testing.assert_close(compiled(x, logits), layer(x, logits), rtol=0, atol=0)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _tiny_qwen3(seed: int = 0) -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("picks", ["hf", "logits"])
def test_compiled_patched_hf_model_fullgraph_equals_eager(picks):
    from epmoe.integrations.hf import patch_model

    model = _tiny_qwen3()
    patch_model(model, picks=picks)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = compiled(ids).logits
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_layer_on_gpu_equals_eager(mode):
    layer = _layer("cuda", runner="triton")
    compiled = torch.compile(layer, fullgraph=True, mode=mode)
    for T in (1, 16, 16, 33):
        x, logits = _inputs(layer, T, "cuda")
        torch.testing.assert_close(compiled(x, logits), layer(x, logits), rtol=0, atol=0)
