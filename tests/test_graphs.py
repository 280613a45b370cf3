"""CUDA-graph capture of the whole layer (GPU only)."""

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, RoutingCapture, VirtualGroup
from epmoe.experts.triton import activation_quant, select_config
from epmoe.layer import SharedExperts
from epmoe.quant import quantize_weights
from epmoe.routing import Routing, route

# fp8_block weights: a call alone at decode size runs weight-only, its bucket's graph w8a8 (hidden
# and activation rounded to e4m3, up to 2^-4 per value, partly averaging out): see
# tests/test_triton_runner.py W8A8_TOL.
W8A8_TOL = 0.1


def test_capture_needs_cuda_and_capturable_pieces():
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    layer = MoELayer(cfg, ExpertWeights.random(cfg, 4))
    with pytest.raises(ValueError, match="CUDA device"):
        layer.capture_graphs(8)


def test_virtual_ranks_refuse_graphs():
    """Virtual ranks exchange through host threads: capture raises a clear error instead of a CUDA
    capture failure."""
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)

    def body(group):
        layer = MoELayer.from_global(cfg, ExpertWeights.random(cfg, 4), group, comm="nccl_a2a")
        with pytest.raises(ValueError, match="virtual ranks share one device"):
            layer.capture_graphs(8)

    VirtualGroup(2).run(body)


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


def _weights(cfg: MoEConfig, fmt: str, g: torch.Generator) -> ExpertWeights:
    """All experts on the GPU: bf16, or bf16 weights quantized to `fmt` (biases stay fp32)."""
    w = ExpertWeights.random(cfg, cfg.num_experts, dtype=torch.bfloat16, device="cuda", generator=g)
    if fmt == "bf16":
        return w
    return ExpertWeights(quantize_weights(w.w13, fmt), quantize_weights(w.w2, fmt), w.b13, w.b2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8_block", "nvfp4"])
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "gpt-oss-120b", "deepseek-v3"])
def test_whole_layer_graph_triton_every_weight_format(preset, fmt):
    """Triton runner, one rank, bf16 / fp8_block / nvfp4 weights (Qwen3: softmax; GPT-OSS: biases,
    clamped SwiGLU; DeepSeek-V3: grouped sigmoid routing with correction bias, shared experts).
    Replays of the captured graph equal eager forwards bit for bit, for T equal to and smaller
    than its bucket (rows past T are padding: a larger call before a smaller one must not leak
    into it), the routing capture reports each replay's T and ids, and no call up to the largest
    bucket runs eagerly."""
    cfg = MoEConfig.from_preset(preset).scaled(hidden=256, intermediate=128, num_experts=16)
    g = torch.Generator().manual_seed(1)
    weights = _weights(cfg, fmt, g)
    bias = torch.randn(cfg.num_experts, generator=g).cuda() * 0.1 if cfg.uses_correction_bias else None
    shared = SharedExperts.random(cfg, torch.bfloat16, "cuda", g) if cfg.shared_experts else None  # DeepSeek-V3
    cap = RoutingCapture(max_tokens=64, top_k=cfg.top_k, device="cuda")
    eager = MoELayer(cfg, weights, runner="triton", correction_bias=bias, shared=shared)
    graphed = MoELayer(cfg, weights, runner="triton", correction_bias=bias, shared=shared, capture=cap)
    assert (graphed.combo.runner, graphed.combo.weights) == ("triton", fmt)
    assert graphed.capture_graphs(64, buckets=[4, 16, 64]) == [4, 16, 64]

    def no_eager(*args):
        raise AssertionError("a call within the buckets ran eagerly")

    graphed._eager = no_eager

    def act_quant(T: int) -> str | None:
        c = select_config(fmt, T * cfg.top_k, cfg.num_experts, cfg.hidden, cfg.intermediate, cfg.top_k,
                          torch.device("cuda"))
        return activation_quant(fmt, c)

    def same_numerics(T: int) -> bool:
        """Eager T and its bucket pick kernels with the same activation quantization."""
        return T == 0 or act_quant(T) == act_quant(min(b for b in (4, 16, 64) if b >= T))
    for T in [64, 40, 1, 16, 3, 11, 4, 0, 64]:
        x = torch.randn(T, cfg.hidden, generator=g).to("cuda", torch.bfloat16)
        logits = torch.randn(T, cfg.num_experts, generator=g).cuda()
        y = graphed(x, logits)
        assert y.shape == (T, cfg.hidden) and y.dtype == torch.bfloat16
        want = eager(x, logits)
        if same_numerics(T):
            torch.testing.assert_close(y, want, atol=0, rtol=0, msg=f"T={T}")
        else:  # e.g. fp8_block: T alone decodes weight-only, its bucket runs w8a8 (e4m3 activations)
            assert float((y.float() - want.float()).abs().max() / want.float().abs().max()) <= W8A8_TOL, f"T={T}"
        assert cap.num_tokens == T and int(cap.num_tokens_dev) == T
        assert torch.equal(cap.captured(), route(logits, cfg, bias).ids), f"T={T}"
        if T:
            assert torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["qwen3-30b-a3b", "deepseek-v3"])
def test_routed_mode_graphs_and_padding_rows_go_nowhere(preset):
    """capture_graphs(routed=True): calls with routing= (RL routing replay) replay the graph and
    equal eager routed calls bit for bit; logits calls then run eagerly. In every bucket, rows past
    the call's T carry expert id -1 (the routing capture shows them), so padding is neither computed
    nor sent."""
    cfg = MoEConfig.from_preset(preset).scaled(hidden=256, intermediate=128, num_experts=16)
    g = torch.Generator().manual_seed(2)
    weights = _weights(cfg, "bf16", g)
    bias = torch.randn(cfg.num_experts, generator=g).cuda() * 0.1 if cfg.uses_correction_bias else None
    shared = SharedExperts.random(cfg, torch.bfloat16, "cuda", g) if cfg.shared_experts else None  # DeepSeek-V3
    cap = RoutingCapture(max_tokens=64, top_k=cfg.top_k, device="cuda")
    eager = MoELayer(cfg, weights, runner="triton", correction_bias=bias, shared=shared)
    graphed = MoELayer(cfg, weights, runner="triton", correction_bias=bias, shared=shared, capture=cap)
    graphed.capture_graphs(64, buckets=[4, 16, 64], routed=True)
    calls = []
    real_eager = graphed._eager
    graphed._eager = lambda *a, **k: calls.append(1) or real_eager(*a, **k)
    for T in [64, 3, 16, 1, 0, 40]:
        x = torch.randn(T, cfg.hidden, generator=g).to("cuda", torch.bfloat16)
        r = route(torch.randn(T, cfg.num_experts, generator=g).cuda(), cfg, bias)
        routing = Routing.external(r.ids, r.weights.flip(1), cfg.num_experts)  # weights not from the router
        y = graphed(x, routing=routing)
        torch.testing.assert_close(y, eager(x, routing=routing), atol=0, rtol=0, msg=f"T={T}")
        bucket = min(b for b in (4, 16, 64) if b >= T)
        assert torch.equal(cap.ids[:T], routing.ids) and bool((cap.ids[T:bucket] == -1).all()), f"T={T}"
    assert not calls, "routed calls within the buckets must replay"
    logits = torch.randn(5, cfg.num_experts, generator=g).cuda()
    x = torch.randn(5, cfg.hidden, generator=g).to("cuda", torch.bfloat16)
    torch.testing.assert_close(graphed(x, logits), eager(x, logits), atol=0, rtol=0)
    assert calls == [1], "a logits call on routed graphs runs eagerly"
    with pytest.raises(ValueError, match="must lie in"):
        graphed(x, routing=Routing(torch.full((5, cfg.top_k), cfg.num_experts, dtype=torch.int32, device="cuda"),
                                   torch.ones(5, cfg.top_k, device="cuda")))

    # logits graphs: padding rows get -1 too, and validate=False skips the host checks
    layer = MoELayer(cfg, weights, runner="triton", correction_bias=bias, shared=shared, capture=cap)
    layer.capture_graphs(16, buckets=[16], validate=False)
    x = torch.randn(3, cfg.hidden, generator=g).to("cuda", torch.bfloat16)
    logits = torch.randn(3, cfg.num_experts, generator=g).cuda()
    torch.testing.assert_close(layer(x, logits), eager(x, logits), atol=0, rtol=0)
    assert bool((cap.ids[3:16] == -1).all()) and torch.equal(cap.captured(), route(logits, cfg, bias).ids)
    layer(x, torch.full_like(logits, float("nan")))  # not read on the host: no error, no sync


@pytest.mark.parametrize("routed", [False, True])
def test_graph_body_on_the_cpu_routes_padding_rows_nowhere(routed):
    """What capture_graphs captures, run eagerly on the CPU: the layer on a bucket's static
    buffers, rows at or past `valid` routed to expert -1. The real rows equal an eager call."""
    from epmoe.graphs import LayerGraphs

    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    g = torch.Generator().manual_seed(0)
    cap = RoutingCapture(max_tokens=8, top_k=cfg.top_k)
    layer = MoELayer(cfg, ExpertWeights.random(cfg, 4, generator=g), capture=cap)
    graphs = LayerGraphs(layer, [2, 8], routed=routed)
    x, logits = torch.randn(3, cfg.hidden, generator=g), torch.randn(3, cfg.num_experts, generator=g)
    r = route(logits, cfg)
    graphs.x.fill_(float("nan"))  # rows past T hold garbage: it must not reach the real rows
    graphs.graphs = {8: None}  # stage only copies the inputs in
    graphs.stage(x, None if routed else logits, r if routed else None, 8)
    y = graphs._body(8)
    assert int(graphs.valid) == 3 and bool((cap.ids[3:8] == -1).all())
    want = layer(x, routing=r) if routed else layer(x, logits)
    torch.testing.assert_close(y[:3], want, atol=0, rtol=0)


def test_lazy_graphs_need_cuda_and_one_rank():
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="CUDA device"):
        MoELayer(cfg, ExpertWeights.random(cfg, 4)).capture_graphs(8, lazy=True)
    with pytest.raises(ValueError, match="power-of-two buckets"):
        MoELayer(cfg, ExpertWeights.random(cfg, 4)).capture_graphs(8, buckets=[8], lazy=True)

    def body(group):
        layer = MoELayer.from_global(cfg, ExpertWeights.random(cfg, 4), group, comm="nccl_a2a")
        with pytest.raises(ValueError, match="serve one rank"):
            layer.capture_graphs(8, lazy=True)

    VirtualGroup(2).run(body)


@pytest.mark.gpu
@pytest.mark.parametrize("routed", [False, True])
def test_lazy_graphs_capture_each_bucket_on_first_use_and_match_eager(routed):
    """capture_graphs(lazy=True): no graph up front, each call's power-of-two bucket captured by its
    first call, replays bitwise equal to eager calls; two layers share one memory pool."""
    cfg = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=256, intermediate=128, num_experts=16)
    g = torch.Generator().manual_seed(1)
    weights = ExpertWeights.random(cfg, 16, dtype=torch.bfloat16, device="cuda", generator=g)
    eager = MoELayer(cfg, weights, runner="triton")
    pool = torch.cuda.graph_pool_handle()
    lazy = [MoELayer(cfg, weights, runner="triton") for _ in range(2)]
    for layer in lazy:
        assert layer.capture_graphs(64, routed=routed, lazy=True, pool=pool) == [1, 2, 4, 8, 16, 32, 64]
        assert layer.graphs.graphs == {}
    for T in [3, 1, 0, 33, 3, 64, 100]:
        x = torch.randn(T, cfg.hidden, generator=g).to("cuda", torch.bfloat16)
        logits = torch.randn(T, cfg.num_experts, generator=g).cuda()
        r = route(logits, cfg)
        for layer in lazy:
            y = layer(x, routing=r) if routed else layer(x, logits)
            torch.testing.assert_close(y, eager(x, routing=r) if routed else eager(x, logits), atol=0, rtol=0)
    assert sorted(lazy[0].graphs.graphs) == [1, 4, 64]  # T = 100 ran eagerly
    assert lazy[0].graphs.pool == lazy[1].graphs.pool == pool
