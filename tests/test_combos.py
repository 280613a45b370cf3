"""Every combination of the compatibility table: valid ones equal the single-rank reference,
invalid ones raise the table's reason. A new backend, runner or format is covered by registering
it; a new format needs one entry in `make_weights` / `PAYLOAD_TOL`."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer
from epmoe.quant import quantize_weights
from epmoe.routing import Routing, route
from epmoe.select import ROUTING_MODES, WEIGHT_FORMATS, Combo, all_combos, check
from tests.dist import run_ranks

CFG = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=32, intermediate=16, num_experts=12)
TOKENS = [5, 0, 3, 1]  # per rank: uneven, and an empty rank
STATIC_MAX_TOKENS = 8  # max_tokens_per_rank of static_shapes combos (>= every rank's T)


def cfg_for(mode: str) -> MoEConfig:
    """CFG with routing mode `mode` ("routed" routes with CFG's own softmax outside the layer).
    Grouped top-k: 4 groups of 3 experts, the best 3 kept (9 >= top_k = 8 candidates)."""
    if mode == "routed":
        return CFG
    if mode == "sigmoid_grouped":
        return CFG.replace(routing=mode, n_group=4, topk_group=3, routed_scaling_factor=2.5)
    return CFG.replace(routing=mode)


def correction_bias(cfg: MoEConfig) -> torch.Tensor | None:
    if not cfg.uses_correction_bias:
        return None
    return torch.linspace(-0.5, 0.5, cfg.num_experts, dtype=torch.float32)

# Relative error bound (max |y - ref| / max |ref|) by payload, fp32 activations. The reference
# is the single-rank layer with the *same* (quantized) expert weights, so the weight format adds
# no error of its own; an unquantized payload differs from it only by summation order.
EXACT_TOL = 1e-5
# Quantized payloads against the unquantized reference: the bounds of tests/test_comm.py and
# their reasoning (e4m3 keeps 3 mantissa bits; nvfp4 rounds up to 1/6 of a 16-value block's max,
# and H = 32 is two blocks per row, so little averages out).
PAYLOAD_TOL = {"bf16": EXACT_TOL, "fp8": 0.15, "fp8_block": 0.15, "nvfp4": 0.5}
# bf16 activations and weights on the GPU: inputs and weights rounded to 8 mantissa bits
# (2^-9 relative each), the output once more; 2% of the largest output covers their sum over
# H = 32 and I = 16 terms with margin. Quantized payloads add their own bound on top.
GPU_TOL = 2e-2
# The Triton runner's w8a8 path (fp8 weights beyond decode sizes) also rounds the hidden rows and
# the activation to e4m3 (tests/test_triton_runner.py W8A8_TOL: up to 2^-4 per value, partly
# averaging out); the reference runner keeps them in fp32.
W8A8_TOL = 0.1


def make_weights(fmt: str, full: ExpertWeights) -> ExpertWeights:
    """All E experts in weight format `fmt` (quantized with epmoe.quant's dynamic scales)."""
    if fmt == "bf16":
        return full
    return ExpertWeights(quantize_weights(full.w13, fmt), quantize_weights(full.w2, fmt))


def _inputs(rank: int, tokens: int):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(tokens, CFG.hidden, generator=g), torch.randn(tokens, CFG.num_experts, generator=g)


def _full_weights():
    return ExpertWeights.random(CFG, CFG.num_experts, generator=torch.Generator().manual_seed(0))


def _options(combo: Combo) -> dict:
    opts = {}
    if combo.payload != "bf16":
        opts["payload"] = combo.payload
    if combo.static_shapes:
        opts.update(static_shapes=True, max_tokens_per_rank=STATIC_MAX_TOKENS)
    return opts


def _call(layer: MoELayer, x: torch.Tensor, logits: torch.Tensor, mode: str) -> torch.Tensor:
    """The layer on x, from logits, or routed mode with the ids/weights CFG's router picks."""
    if mode != "routed":
        return layer(x, logits)
    r = route(logits.float(), CFG)
    return layer(x, routing=Routing.external(r.ids, r.weights, CFG.num_experts))


def _one(group, c: Combo, full: ExpertWeights, device: torch.device, dtype: torch.dtype):
    """Run combo `c` on this rank; return (name, relative error vs the fp32 reference, finite)."""
    rank = group.rank if group is not None else 0
    weights = make_weights(c.weights, full)
    if c.layout == "tp":  # every rank holds the same tokens
        x, logits = _inputs(0, 7)
    else:
        x, logits = _inputs(rank, TOKENS[rank])
    if isinstance(weights.w13, torch.Tensor):
        on_dev = ExpertWeights(weights.w13.to(device, dtype), weights.w2.to(device, dtype))
    else:
        on_dev = ExpertWeights(weights.w13.to(device), weights.w2.to(device))
    cfg, bias = cfg_for(c.routing), correction_bias(cfg_for(c.routing))
    layer = MoELayer.from_global(cfg, on_dev, group, comm=c.comm, runner=c.runner, layout=c.layout,
                                 comm_options=_options(c),
                                 correction_bias=None if bias is None else bias.to(device))
    y = torch.full(x.shape, float("nan"), dtype=dtype, device=device)
    y.copy_(_call(layer, x.to(device, dtype), logits.to(device), c.routing))
    # the table's "bf16" stands for unquantized weights; the layer's combo names their dtype
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    shown = names[dtype] if c.weights == "bf16" else None
    assert layer.combo == (replace(c, weights=shown) if shown else c), (layer.combo, c)
    ref = _call(MoELayer(cfg, weights, correction_bias=bias), x, logits, c.routing)
    scale = max(ref.abs().max().item(), 1e-6) if ref.numel() else 1.0
    err = (y.float().cpu() - ref).abs().max().item() / scale if ref.numel() else 0.0
    return str(c), err, bool(torch.isfinite(y).all())


def _run_combos(group, combos):
    full = _full_weights()
    return [_one(group, c, full, torch.device("cpu"), torch.float32) for c in combos]


def _valid_cpu(world):
    return [c for c in all_combos(worlds=(world,), devices=("cpu",)) if not c.graph and check(c)[0]]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_valid_combos_match_reference(world):
    combos = _valid_cpu(world)
    assert combos, "the table must hold at least one valid CPU combination per world size"
    assert {c.weights for c in combos} == set(WEIGHT_FORMATS), "every weight format must run somewhere"
    assert {c.routing for c in combos} == set(ROUTING_MODES), "every routing mode must run somewhere"
    if world > 1:
        assert any(c.static_shapes for c in combos), "static_shapes backends must be enumerated"
    for rank_errors in run_ranks(_run_combos, world, args=(combos,)):
        for (name, err, finite), c in zip(rank_errors, combos):
            assert finite, f"{name}: non-finite output (unwritten rows?)"
            assert err <= PAYLOAD_TOL[c.payload], f"{name}: rel err {err:.3g}"


def _fake_group(world: int, nodes: int = 1) -> SimpleNamespace:
    """Rank 0 of a group used for construction only: what a RankGroup declares, and the one
    exchange of construction (the layer's agreement), answered as if every rank sent rank 0's ints."""
    return SimpleNamespace(rank=0, world=world, nodes=nodes, backend="fake", virtual=False, call="",
                           all_gather_ints=lambda values, device="cpu": [list(values)] * world)


def test_invalid_combos_raise_the_documented_reason():
    full = _full_weights()
    invalid = [c for c in all_combos(devices=("cpu",)) if not check(c)[0]]
    assert invalid
    for c in invalid:
        reason = check(c)[1]
        group = _fake_group(world=c.world) if c.world > 1 else None
        if c.graph:
            continue  # graphs are chosen at capture time, not construction
        cfg = cfg_for(c.routing)
        with pytest.raises(ValueError, match="unsupported combination") as info:
            MoELayer.from_global(cfg, make_weights(c.weights, full), group, comm=c.comm, runner=c.runner,
                                 layout=c.layout, comm_options=_options(c), correction_bias=correction_bias(cfg))
        assert reason in str(info.value), c
        assert "Valid alternatives" in str(info.value)


def test_check_reasons_name_the_fix():
    ok, reason = check(Combo(comm="none", layout="dp", world=2))
    assert not ok and "tp layout" in reason
    ok, reason = check(Combo(graph=True, device="cpu"))
    assert not ok and "CUDA device" in reason
    assert check(Combo())[0]
    ok, reason = check(Combo(comm="nccl_a2a", runner="triton", world=2, device="cuda", graph=True))
    assert not ok and "static_shapes=True" in reason
    assert check(Combo(comm="nccl_a2a", runner="triton", world=2, device="cuda", graph=True,
                       static_shapes=True))[0]
    ok, reason = check(Combo(comm="symm_a2a", world=2, static_shapes=True))
    assert not ok and "no static_shapes option" in reason
    ok, reason = check(Combo(comm="symm_a2a", world=4, nodes=2))
    assert not ok and "one NVLink domain" in reason
    ok, reason = check(Combo(routing="topk"))
    assert not ok and "routed" in reason


@pytest.mark.parametrize(("world", "nodes", "why"), [
    (0, 1, "world >= 1"), (-2, 1, "world >= 1"), (2, 0, "nodes >= 1"), (2, 3, "nodes <= world"),
])
def test_check_bounds_world_and_nodes(world, nodes, why):
    ok, reason = check(Combo(comm="nccl_a2a", world=world, nodes=nodes))
    assert not ok and why in reason
    assert check(Combo(comm="nccl_a2a", world=2, nodes=2))[0]


def test_layer_takes_nodes_from_its_group():
    """A group spanning hosts rules out single-node backends: an explicit one raises the table's
    reason, auto leaves it out."""
    full = _full_weights()
    two_hosts = _fake_group(world=2, nodes=2)
    with pytest.raises(ValueError, match="one NVLink domain"):
        MoELayer.from_global(CFG, full, two_hosts, comm="symm_a2a")
    layer = MoELayer.from_global(CFG, full, two_hosts, comm="auto", comm_options={"max_tokens_per_rank": 8})
    assert "symm_a2a" not in layer.comms and layer.combo.nodes == 2


def _auto_picks(group):
    layer = MoELayer.from_global(CFG, _full_weights(), group, comm="auto", comm_options={"max_tokens_per_rank": 64})
    names = list(layer.comms)
    first = layer.combo.comm
    x, logits = _inputs(group.rank, 40)
    layer(x, logits)
    return names, first, layer.combo.comm, layer.auto.ladder


def test_combo_reports_what_auto_picked():
    """Under comm="auto" `combo.comm` is the backend of the last call (before any call, auto's
    pick for one token), never just the first candidate."""
    from epmoe.select import pick_comm

    for names, first, after, ladder in run_ranks(_auto_picks, 2):
        assert first == pick_comm(1, names, ladder)
        assert after == pick_comm(40, names, ladder)


def test_pick_comm_follows_the_ladder_and_falls_back():
    from epmoe.select import pick_comm

    ladder = [(64, "symm_a2a"), (2048, "nccl_a2a"), (None, "allgather")]
    cands = ["allgather", "nccl_a2a", "symm_a2a"]
    assert [pick_comm(t, cands, ladder) for t in (1, 64, 65, 2048, 5000)] == [
        "symm_a2a", "symm_a2a", "nccl_a2a", "nccl_a2a", "allgather"]
    # symm_a2a not available (e.g. across nodes): small batches fall to the next rung
    assert pick_comm(1, ["allgather", "nccl_a2a"], ladder) == "nccl_a2a"
    assert pick_comm(1, ["none"], ladder) == "none"


def test_auto_choices_on_one_rank():
    from epmoe.select import pick_runner

    assert pick_runner("cpu", "bf16") == "reference"
    layer = MoELayer(CFG, _full_weights(), comm="auto", runner="auto")
    assert layer.combo.comm == "none" and layer.combo.runner == "reference"
    x, logits = _inputs(0, 6)
    torch.testing.assert_close(layer(x, logits), MoELayer(CFG, _full_weights())(x, logits), atol=0, rtol=0)


def _run_virtual(group, combos):
    full = _full_weights()
    return [_one(group, c, full, torch.device("cuda"), torch.bfloat16) for c in combos]


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2, 4])
def test_valid_gpu_combos_virtual_ranks_match_reference(world):
    from epmoe import VirtualGroup

    combos = [c for c in all_combos(worlds=(world,), devices=("cuda",)) if not c.graph and check(c)[0]]
    assert combos
    per_rank = VirtualGroup(world).run(lambda g: _run_virtual(g, combos))
    for rank_errors in per_rank:
        for (name, err, finite), c in zip(rank_errors, combos):
            assert finite, f"{name}: non-finite output"
            bound = GPU_TOL + (PAYLOAD_TOL[c.payload] if c.payload != "bf16" else 0.0)
            if c.runner == "triton" and c.weights in ("fp8", "fp8_block"):
                bound += W8A8_TOL  # the runner quantizes activations to e4m3 at these sizes
            assert err <= bound, f"{name}: rel err {err:.3g}"


def test_rules_read_declared_capabilities_not_names(monkeypatch):
    """select.py names no backend or runner: a backend registered under another name with the
    declarations of "none" is held to the same rules, and pick_runner takes the highest
    declared priority that fits."""
    from epmoe.comm import COMM_BACKENDS, get_comm
    from epmoe.experts import RUNNERS, get_runner
    from epmoe.select import pick_runner

    clone = type("LocalClone", (get_comm("none"),), {"name": "local_clone"})
    both = type("BothLayouts", (get_comm("nccl_a2a"),), {"name": "both_layouts", "layouts": ("dp", "tp")})
    monkeypatch.setattr(COMM_BACKENDS, "_items", {**COMM_BACKENDS._items, "local_clone": clone, "both_layouts": both})
    ok, reason = check(Combo(comm="local_clone", world=2))
    assert not ok and "comm 'local_clone' moves no tokens" in reason
    assert check(Combo(comm="local_clone", layout="tp", world=2))[0]
    ok, reason = check(Combo(comm="both_layouts", layout="tp", world=2))
    assert not ok and "use comm 'local_clone' or 'none'" in reason

    fast = type("FastBf16", (get_runner("reference"),), {"name": "fast_bf16", "formats": ("bf16",), "priority": 99})
    monkeypatch.setattr(RUNNERS, "_items", {**RUNNERS._items, "fast_bf16": fast})
    assert pick_runner("cpu", "bf16") == "fast_bf16"
    assert pick_runner("cpu", "fp8") == "reference"  # the fast one does not compute fp8 weights
    with pytest.raises(ValueError, match="no registered runner computes nvfp4 weights on cpu inside a CUDA graph"):
        pick_runner("cpu", "nvfp4", graph=True)
    assert pick_runner("cpu", "fp32") == pick_runner("cpu", "fp16") == "fast_bf16"  # "bf16" = the float family


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp32"])
def test_unquantized_formats_are_one_family_in_the_table(fmt):
    """fp32 and fp16 weights name their dtype in a Combo and are held to the rules of "bf16"."""
    from epmoe.select import ensure, pick_runner

    for runner in ("reference", "triton"):
        for device in ("cpu", "cuda"):
            base = Combo(runner=runner, device=device, weights="bf16")
            assert check(replace(base, weights=fmt)) == check(base)
    assert pick_runner("cpu", fmt) == "reference" and pick_runner("cuda", fmt) == "triton"
    ensure(Combo(weights=fmt))
    ok, reason = check(Combo(runner="triton", weights=fmt))
    assert not ok and "runs on cuda, not cpu" in reason
