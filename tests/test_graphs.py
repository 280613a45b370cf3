"""CUDA-graph capture of the whole layer (GPU only)."""

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, RoutingCapture
from epmoe.routing import route


def test_capture_needs_cuda_and_capturable_pieces():
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    layer = MoELayer(cfg, ExpertWeights.random(cfg, 4))
    with pytest.raises(ValueError, match="CUDA device"):
        layer.capture_graphs(8)


@pytest.mark.gpu
def test_reference_runner_refuses_graphs():
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    layer = MoELayer(cfg, ExpertWeights.random(cfg, 4, device="cuda"), runner="reference")
    with pytest.raises(ValueError, match="reads counts on the host"):
        layer.capture_graphs(8)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "gpt-oss-120b"])
def test_graph_replay_matches_eager_and_padding_never_leaks(preset):
    cfg = MoEConfig.from_preset(preset).scaled(hidden=256, intermediate=128, num_experts=16)
    g = torch.Generator().manual_seed(0)
    weights = ExpertWeights.random(cfg, 16, dtype=torch.bfloat16, device="cuda", generator=g)
    cap = RoutingCapture(max_tokens=64, top_k=cfg.top_k, device="cuda")
    eager = MoELayer(cfg, weights, runner="triton")
    graphed = MoELayer(cfg, weights, runner="triton", capture=cap)
    assert graphed.capture_graphs(64, buckets=[1, 8, 64]) == [1, 8, 64]
    for T in [0, 1, 5, 8, 33, 64, 64]:
        x = torch.randn(T, cfg.hidden, generator=g).to("cuda", torch.bfloat16)
        logits = torch.randn(T, cfg.num_experts, generator=g).cuda()
        y = graphed(x, logits)
        assert y.shape == (T, cfg.hidden)
        torch.testing.assert_close(y, eager(x, logits), atol=0, rtol=0)
        assert cap.num_tokens == T and int(cap.num_tokens_dev) == T
        assert torch.equal(cap.captured(), route(logits, cfg).ids)
    with pytest.raises(ValueError, match="NaN or inf"):
        graphed(x, torch.full_like(logits, float("nan")))
