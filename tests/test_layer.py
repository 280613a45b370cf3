import math
from dataclasses import dataclass

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Placement, Routing, RoutingCapture, SharedExperts, VirtualGroup
from epmoe import layer as layer_module
from epmoe.comm.symmetric import SymmTimeoutError
from epmoe.experts import naive_moe
from epmoe.graphs import Bucket, LayerGraphs
from epmoe.group import VirtualGroupError
from epmoe.quant import quantize_weights
from epmoe.routing import route
from tests.dist import run_ranks

# fp32 layer vs the fp32 per-token loop: same math, different summation order.
TOL = {"atol": 2e-5, "rtol": 2e-5}


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    preset: str = "qwen3-30b-a3b"
    experts: int = 16
    skew: str = "uniform"  # "uniform" | "one_expert" | "power_law"


CASES = [
    Case("zero_tokens", 0),
    Case("one_token", 1),
    Case("uniform", 37),
    Case("all_to_one_expert", 19, skew="one_expert"),
    Case("power_law", 64, skew="power_law"),
    Case("deepseek_grouped_shared", 23, preset="deepseek-v3"),
    Case("gpt_oss_swiglu_bias", 17, preset="gpt-oss-120b"),
    Case("minimax_sigmoid_bias", 13, preset="minimax-m2.5"),
    Case("olmoe_unnormalised", 11, preset="olmoe-1b-7b"),
]


def _setup(case: Case, seed: int = 0):
    cfg = MoEConfig.from_preset(case.preset).scaled(hidden=48, intermediate=24, num_experts=case.experts)
    if cfg.routing == "sigmoid_grouped":
        cfg = cfg.replace(n_group=4, topk_group=2)
    g = torch.Generator().manual_seed(seed)
    weights = ExpertWeights.random(cfg, cfg.num_experts, generator=g)
    x = torch.randn(case.tokens, cfg.hidden, generator=g)
    logits = torch.randn(case.tokens, cfg.num_experts, generator=g)
    if case.skew == "one_expert":
        logits[:, 5] += 100.0
    elif case.skew == "power_law":
        logits += 3.0 * torch.log1p(torch.arange(cfg.num_experts, dtype=torch.float32)).neg()
    bias = torch.randn(cfg.num_experts, generator=g) * 0.1 if cfg.uses_correction_bias else None
    shared = SharedExperts.random(cfg, generator=g) if cfg.shared_experts else None
    return cfg, weights, x, logits, bias, shared


def _expected(cfg, weights, x, logits, bias, shared):
    r = route(logits, cfg, bias)
    y = naive_moe(x, r.ids, r.weights, weights, cfg)
    if shared is not None:
        y = y + shared(x, cfg)
    return y


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_single_rank_matches_naive_loop(case):
    cfg, weights, x, logits, bias, shared = _setup(case)
    layer = MoELayer(cfg, weights, correction_bias=bias, shared=shared)
    y = layer(x, logits)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, _expected(cfg, weights, x, logits, bias, shared), **TOL)
    if case.skew == "one_expert":
        assert bool((route(logits, cfg, bias).ids == 5).any(dim=1).all())


def _tp_rank(group, case):
    cfg, weights, x, logits, bias, shared = _setup(case)
    layer = MoELayer.from_global(cfg, weights, group, layout="tp", correction_bias=bias, shared=shared)
    return layer(x, logits)


@pytest.mark.parametrize("world", [2, 4])
def test_tp_layout_over_gloo_matches_single_rank(world):
    for case in CASES:
        cfg, weights, x, logits, bias, shared = _setup(case)
        expect = _expected(cfg, weights, x, logits, bias, shared)
        outs = run_ranks(_tp_rank, world, args=(case,))
        for rank, y in enumerate(outs):
            torch.testing.assert_close(y, expect, **TOL, msg=f"{case.name} rank {rank}")
        # every rank of a tp group ends with the same bits
        assert all(torch.equal(outs[0], y) for y in outs[1:])


def test_tp_layout_virtual_group_matches_single_rank():
    case = Case("uniform", 29)
    cfg, weights, x, logits, bias, shared = _setup(case)
    single = MoELayer(cfg, weights)(x, logits)
    outs = VirtualGroup(4).run(lambda g: MoELayer.from_global(cfg, weights, g, layout="tp")(x, logits))
    for y in outs:
        torch.testing.assert_close(y, single, **TOL)


def test_virtual_group_reports_failing_rank():
    def body(g):
        if g.rank == 2:
            raise RuntimeError("bad rank")
        t = torch.ones(1)
        return g.all_reduce(t)

    with pytest.raises(VirtualGroupError, match="virtual rank 2 failed"):
        VirtualGroup(4, timeout=5).run(body)


def test_routed_mode_and_capture():
    case = Case("uniform", 9)
    cfg, weights, x, logits, _, _ = _setup(case)
    cap = RoutingCapture(max_tokens=16, top_k=cfg.top_k)
    layer = MoELayer(cfg, weights, capture=cap)
    ids = torch.stack([torch.randperm(cfg.num_experts)[: cfg.top_k] for _ in range(9)]).long()
    w = torch.rand(9, cfg.top_k)
    y = layer(x, routing=Routing.external(ids, w, cfg.num_experts))
    torch.testing.assert_close(y, naive_moe(x, ids, w, weights, cfg), **TOL)
    assert torch.equal(cap.captured(), ids.int())
    # gate path: the layer computes its own logits
    gate = torch.randn(cfg.num_experts, cfg.hidden)
    gated = MoELayer(cfg, weights, gate=gate, capture=cap)
    y2 = gated(x)
    r = route(x @ gate.T, cfg)
    torch.testing.assert_close(y2, naive_moe(x, r.ids, r.weights, weights, cfg), **TOL)
    assert torch.equal(cap.captured(), r.ids)


def test_half_precision_inputs_keep_dtype():
    case = Case("uniform", 8)
    cfg, weights, x, logits, _, _ = _setup(case)
    layer = MoELayer(cfg, ExpertWeights(weights.w13.half(), weights.w2.half()))
    y = layer(x.half(), logits)
    assert y.dtype == torch.float16
    expect = naive_moe(x.half(), route(logits, cfg).ids, route(logits, cfg).weights,
                       ExpertWeights(weights.w13.half(), weights.w2.half()), cfg)
    torch.testing.assert_close(y.float(), expect, atol=2e-3, rtol=2e-3)


def test_bad_input_raises_clear_errors():
    case = Case("uniform", 4)
    cfg, weights, x, logits, _, _ = _setup(case)
    layer = MoELayer(cfg, weights)
    with pytest.raises(ValueError, match=r"x must be \[T, 48\]"):
        layer(x[:, :10], logits)
    with pytest.raises(ValueError, match="x must be bf16, fp16 or fp32"):
        layer(x.double(), logits)
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(x, torch.full_like(logits, float("nan")))
    x5 = torch.randn(5, cfg.hidden)
    shapes = r"router_logits must be \[T, E\] = \[5, 16\] for x of shape \(5, 48\).*got \(3, 16\)"
    with pytest.raises(ValueError, match=shapes):
        layer(x5, torch.randn(3, cfg.num_experts))  # used to return [3, H] silently
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E\] = \[4, 16\].*got \(4, 15\)"):
        layer(x, logits[:, :15])
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E\].*got \(64,\)"):
        layer(x, logits.flatten())
    bad_ids = torch.zeros(4, cfg.top_k, dtype=torch.int32)
    bad_ids[:, 1] = 99
    with pytest.raises(ValueError, match="must lie in"):
        layer(x, routing=Routing(bad_ids, torch.ones(4, cfg.top_k)))
    dup = torch.zeros(4, cfg.top_k, dtype=torch.int32)
    with pytest.raises(ValueError, match="repeat an expert"):
        layer(x, routing=Routing(dup, torch.ones(4, cfg.top_k)))
    with pytest.raises(ValueError, match="pass router_logits or routing"):
        layer(x)
    with pytest.raises(ValueError, match="expert weight w13 has shape"):
        MoELayer(cfg, ExpertWeights(weights.w13[:, :5], weights.w2))
    with pytest.raises(ValueError, match="not divisible by the EP world size 3"):
        Placement.contiguous(16, 3)
    with pytest.raises(ValueError, match="unknown comm backend 'nope'"):
        MoELayer(cfg, weights, comm="nope")
    with pytest.raises(ValueError, match="unknown expert runner 'nope'"):
        MoELayer(cfg, weights, runner="nope")
    with pytest.raises(ValueError, match="unknown layout"):
        MoELayer(cfg, weights, layout="ep")


def _dp_none_rank(group):
    cfg = MoEConfig(hidden=8, intermediate=4, num_experts=4, top_k=2)
    MoELayer.from_global(cfg, ExpertWeights.random(cfg, 4), group, comm="none", layout="dp")


def test_none_backend_refuses_dp_with_several_ranks():
    with pytest.raises(VirtualGroupError, match="comm 'none' moves no tokens: with several ranks it needs the tp"):
        VirtualGroup(2).run(_dp_none_rank)


def test_gate_bias_by_hand():
    """GPT-OSS router: logits = x @ gate.T + gate_bias, top-k on the logits, softmax over the k."""
    cfg = MoEConfig(hidden=2, intermediate=4, num_experts=4, top_k=2, routing="softmax_after_topk")
    weights = ExpertWeights.random(cfg, 4, generator=torch.Generator().manual_seed(0))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    bias = torch.tensor([0.0, 2.0, -0.5, 0.0])
    # token 0: x @ gate.T = [1, 0, 1, -1] + bias = [1, 2, 0.5, -1] -> experts 1, 0
    # token 1: x @ gate.T = [0, 1, 1, 0]  + bias = [0, 3, 0.5, 0]  -> experts 1, 2
    e = math.e
    ids = torch.tensor([[1, 0], [1, 2]])
    w = torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (1 + e**-2.5), e**-2.5 / (1 + e**-2.5)]])
    cap = RoutingCapture(max_tokens=4, top_k=2)
    layer = MoELayer(cfg, weights, gate=gate, gate_bias=bias, capture=cap)
    y = layer(x)
    assert cap.captured().tolist() == ids.tolist()
    torch.testing.assert_close(y, naive_moe(x, ids, w, weights, cfg), **TOL)
    # without the bias token 0 ties experts 0 and 2 (both 1.0): the lowest id wins, then 2
    assert route(x @ gate.T, cfg).ids[0].tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"gate_bias must be a float \[4\] tensor"):
        MoELayer(cfg, weights, gate=gate, gate_bias=torch.zeros(5))
    with pytest.raises(ValueError, match="pass gate= as well"):
        MoELayer(cfg, weights, gate_bias=bias)


@pytest.mark.parametrize("routing", ["sigmoid_bias", "sigmoid_grouped"])
def test_non_finite_or_misshapen_correction_bias_is_refused(routing):
    cfg = MoEConfig(hidden=8, intermediate=4, num_experts=8, top_k=2, routing=routing, n_group=4, topk_group=2)
    weights = ExpertWeights.random(cfg, 8)
    bias = torch.zeros(8)
    bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"correction_bias .*NaN or inf at experts \[3\]"):
        MoELayer(cfg, weights, correction_bias=bias)
    with pytest.raises(ValueError, match=r"correction_bias must be \[8\], got \(7,\)"):
        MoELayer(cfg, weights, correction_bias=torch.zeros(7))
    with pytest.raises(ValueError, match="correction_bias must be a float tensor"):
        MoELayer(cfg, weights, correction_bias=torch.zeros(8, dtype=torch.int64))


def test_default_runner_is_auto_and_reference_on_cpu(monkeypatch):
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    w = ExpertWeights.random(cfg, 4)
    assert MoELayer(cfg, w).combo.runner == "reference"
    asked = []
    monkeypatch.setattr(layer_module, "pick_runner", lambda *a, **k: asked.append(a) or "reference")
    MoELayer(cfg, w)
    assert asked == [("cpu", "fp32")]  # the default goes through select.pick_runner
    monkeypatch.undo()
    q = ExpertWeights(quantize_weights(w.w13, "fp8"), quantize_weights(w.w2, "fp8"))
    assert MoELayer(cfg, q).combo.runner == "reference"


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "fp32"), (torch.float16, "fp16"),
                                             (torch.bfloat16, "bf16")])
def test_weight_format_names_the_dtype(dtype, name):
    """Unquantized weights report their own dtype (the format, the combo, the repr) and run alike."""
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    w = ExpertWeights.random(cfg, 4, dtype=dtype)
    assert w.format == name
    layer = MoELayer(cfg, w)
    assert layer.combo.weights == name and layer.combo.runner == "reference"
    assert f"weights={name}" in repr(layer)
    x = torch.randn(5, 16, dtype=dtype)
    ref = MoELayer(cfg, ExpertWeights(w.w13.float(), w.w2.float()))(x.float(), torch.zeros(5, 4))
    torch.testing.assert_close(layer(x, torch.zeros(5, 4)).float(), ref, atol=2e-2, rtol=2e-2)


def test_non_float_weights_are_refused():
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    w = ExpertWeights.random(cfg, 4)
    with pytest.raises(ValueError, match=r"w13 is torch.int8; unquantized weights must be bf16, fp16 or fp32"):
        MoELayer(cfg, ExpertWeights(w.w13.to(torch.int8), w.w2))
    with pytest.raises(ValueError, match=r"w2 is float64, which the runners do not support; convert it"):
        MoELayer(cfg, ExpertWeights(w.w13, w.w2.double()))


def _symm_layer(group, dtype, quantized):
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    w = ExpertWeights.random(cfg, 4)
    if quantized:
        w = ExpertWeights(quantize_weights(w.w13, "fp8"), quantize_weights(w.w2, "fp8"))
    else:
        w = ExpertWeights(w.w13.to(dtype), w.w2.to(dtype))
    layer = MoELayer.from_global(cfg, w, group, comm="symm_a2a", comm_options={"max_tokens_per_rank": 8})
    comm = layer.comm
    return comm.layout is not None, comm.device, comm.dtype


@pytest.mark.parametrize(("dtype", "quantized", "expect"), [
    (torch.float16, False, torch.float16), (torch.float32, False, torch.float32), (None, True, torch.float32),
])
def test_comm_workspace_is_set_up_at_construction(dtype, quantized, expect):
    """symm_a2a takes device= and dtype=: the layer passes the weights' device and float dtype
    (fp32 for quantized weights on the CPU), so the workspace exists before the first forward."""
    for ready, device, got in VirtualGroup(2).run(lambda g: _symm_layer(g, dtype, quantized)):
        assert ready and device == torch.device("cpu") and got == expect


class _Graph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class _TimedOutComm:
    """A backend whose graph recorded a timeout: after_replay reads it as symm_a2a's does (its
    check(), unless check_errors is off)."""

    check_errors = True

    def __init__(self):
        self.checks = 0

    def check(self):
        self.checks += 1
        raise SymmTimeoutError("symm_a2a rank 0: a wait timed out")

    def after_replay(self):
        if self.check_errors:
            self.check()


def test_graph_replay_checks_the_comm_error_word():
    """After a replay the layer's graphs call the bucket's comm backend's after_replay (symm_a2a
    reads its error word there, as an eager combine does); the graph itself is faked here (CUDA
    graphs need a GPU)."""
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    layer = MoELayer(cfg, ExpertWeights.random(cfg, 4))
    graph, comm = _Graph(), _TimedOutComm()
    graphs = LayerGraphs(layer, [4])
    graphs.graphs = {4: Bucket(4, graph, torch.zeros(4, cfg.hidden), comm)}
    x, logits = torch.randn(3, cfg.hidden), torch.randn(3, cfg.num_experts)
    with pytest.raises(SymmTimeoutError, match="timed out"):
        graphs.replay(x, logits, None, 4)
    assert graph.replays == 1 and comm.checks == 1 and int(graphs.valid) == 3
    comm.check_errors = False  # the caller checks itself
    assert graphs.replay(x, logits, None, 4).shape == (3, cfg.hidden)
    assert comm.checks == 1


def test_from_global_needs_every_expert():
    """from_global slices this rank's experts out of all E: weights of more or fewer experts than
    cfg.num_experts are refused, naming both counts (they used to be cut silently, or fail with
    an IndexError)."""
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=8, top_k=2)
    for n in (16, 4):
        with pytest.raises(ValueError, match=rf"all_weights holds {n} experts, cfg has num_experts=8"):
            MoELayer.from_global(cfg, ExpertWeights.random(cfg, n))
    assert MoELayer.from_global(cfg, ExpertWeights.random(cfg, 8)).placement.local_experts == 8


def test_repr_names_shapes_comm_runner_and_ranks():
    cfg = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, routing="sigmoid_bias", shared_experts=1)
    weights = ExpertWeights.random(cfg, 8)
    shared = SharedExperts.random(cfg)
    text = repr(MoELayer(cfg, weights, shared=shared, correction_bias=torch.zeros(8)))
    for part in ("hidden=32", "intermediate=16", "experts=8 (8 on this rank)", f"top_k={cfg.top_k}",
                 "routing=sigmoid_bias", "comm=none", "payload=bf16", "runner=reference", "layout=dp",
                 "rank=0/world=1", "weights=fp32", "shared=1x16"):
        assert part in text, (part, text)

    def ranked(g):
        return repr(MoELayer.from_global(cfg, weights, g, comm="auto", shared=shared, correction_bias=torch.zeros(8)))

    texts = VirtualGroup(2).run(ranked)
    assert "rank=1/world=2" in texts[1] and "experts=8 (4 on this rank)" in texts[1]
    assert "comm=auto (" in texts[0] and "last " in texts[0]


def _auto_world2(group, options):
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    return MoELayer.from_global(cfg, ExpertWeights.random(cfg, 4), group, comm="auto", comm_options=options)


def test_auto_options_go_to_the_candidates_that_have_them():
    """Under comm="auto" every option must belong to some candidate (a typo raises, listing the
    valid ones); each candidate gets the keys its Options has; one rank (and the tp layout) runs
    only backends that move no tokens, and the Combo says what really moves."""
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    w = ExpertWeights.random(cfg, 4)
    with pytest.raises(ValueError, match=r"comm 'auto' has no option 'paylod'; its candidates' options: .*payload"):
        MoELayer(cfg, w, comm="auto", comm_options={"paylod": "fp8"})
    layer = MoELayer(cfg, w, comm="auto", comm_options={"payload": "fp8", "max_tokens_per_rank": 8})
    assert list(layer.comms) == ["none"] and all(not c.moves_tokens for c in layer.comms.values())
    assert layer.combo.payload == "bf16"  # "none" moves the activations as they are
    x, logits = torch.randn(3, cfg.hidden), torch.randn(3, cfg.num_experts)
    torch.testing.assert_close(layer(x, logits), MoELayer(cfg, w)(x, logits), atol=0, rtol=0)

    layers = VirtualGroup(2).run(lambda g: _auto_world2(g, {"payload": "fp8", "gather": "a2a"}))
    for layer in layers:
        comms = layer.comms
        assert len(comms) > 1 and all(c.moves_tokens for c in comms.values())
        assert all(c.payload == "fp8" for c in comms.values()), {n: c.payload for n, c in comms.items()}
        assert layer.combo.payload == "fp8" and layer.combo.comm == layer.comm.name
    with pytest.raises(VirtualGroupError, match="comm 'auto' has no option 'payload'; its candidates' options: impl"):
        VirtualGroup(2).run(lambda g: MoELayer.from_global(cfg, w, g, comm="auto", layout="tp",
                                                           comm_options={"payload": "fp8"}))


def test_auto_without_a_fitting_backend_names_every_reason():
    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=4, top_k=2)
    w = ExpertWeights.random(cfg, 4)
    with pytest.raises(VirtualGroupError, match=r"comm 'auto': no registered backend can run \(comm=auto, .*"
                                                r"payload=int4.*nccl_a2a: comm 'nccl_a2a' moves .* not int4"):
        VirtualGroup(2).run(lambda g: MoELayer.from_global(cfg, w, g, comm="auto", comm_options={"payload": "int4"}))


def _small_layer(device: str = "cpu", **kwargs) -> MoELayer:
    cfg = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=32, intermediate=16, num_experts=8)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = ExpertWeights.random(cfg, 8, dtype=dtype, device=device, generator=torch.Generator().manual_seed(0))
    return MoELayer(cfg, w, **kwargs)


def test_validate_reads_values_once_or_never():
    """validate=True (default): NaN logits and bad routed ids raise; validate=False reads nothing on the host
    (shapes and dtypes are still checked)."""
    strict, trusting = _small_layer(), _small_layer(validate=False)
    x = torch.randn(3, 32)
    nan = torch.full((3, 8), float("nan"))
    with pytest.raises(ValueError, match="router_logits contain NaN or inf"):
        strict(x, nan)
    assert trusting(x, nan).shape == (3, 32)
    repeated = Routing(torch.tensor([[1, 1]] * 3, dtype=torch.int32).repeat(1, 4), torch.ones(3, 8))
    with pytest.raises(ValueError, match="repeat an expert within token 0"):
        strict(x, routing=repeated)
    nonfinite = Routing(torch.arange(8, dtype=torch.int32).repeat(3, 1), torch.full((3, 8), float("inf")))
    with pytest.raises(ValueError, match="routing weights contain NaN or inf"):
        strict(x, routing=nonfinite)
    with pytest.raises(ValueError, match=r"x must be \[T, 32\]"):
        trusting(torch.randn(3, 31), torch.randn(3, 8))
    good = torch.randn(3, 8)
    torch.testing.assert_close(trusting(x, good), strict(x, good), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unvalidated_eager_call_never_syncs_with_the_gpu():
    layer = _small_layer("cuda", validate=False)
    x = torch.randn(5, 32, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(5, 8, device="cuda")
    layer(x, logits)  # warm-up: compilation, first-call state
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = layer(x, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y.shape == (5, 32)
