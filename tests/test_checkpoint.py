"""Checkpoint loading: small checkpoints of every format and naming scheme, loaded at EP world
1, 2 and 4; bad input; and the real DeepSeek-V3 fp8 / ModelOpt nvfp4 layouts (names, dtypes,
shapes) checked header-only."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from epmoe import ExpertWeights, MoEConfig, MoELayer, Placement
from epmoe import checkpoint as checkpoint_module
from epmoe.checkpoint import CheckpointFiles, load_moe_layer, validate_layer
from epmoe.comm.base import Dispatched
from epmoe.experts import get_runner, naive_moe
from epmoe.experts.reference import reference_experts
from epmoe.experts.triton import _check_quantized
from epmoe.experts.triton_prepare import _scale_rows
from epmoe.layer import SharedExperts
from epmoe.ops.combine import count_experts
from epmoe.quant import (
    E2M1_VALUES,
    quantize_activations,
    quantize_fp8,
    quantize_fp8_block_torch,
    quantize_nvfp4_torch,
    quantize_weights,
)
from epmoe.routing import route
from tests.dist import run_ranks

# (the Triton runner runs on the CPU through the interpreter: tests/conftest.py fixes its scalar index)

LAYER = 3
# DeepSeek-style layer at test size: grouped sigmoid routing with correction bias, one shared
# expert. H = 192 leaves a partial 128-block; I = 128 lets gate/up block scales be fused as they
# are, I = 192 puts up's rows off the 128-row grid of the fused w13.
DS = MoEConfig.from_preset("deepseek-v3").replace(hidden=192, intermediate=128, num_experts=8, n_group=4,
                                                  topk_group=2, top_k=2)
DS_I192 = DS.replace(intermediate=192)
MIXTRAL = MoEConfig.from_preset("mixtral-8x7b").scaled(hidden=64, intermediate=48, num_experts=8)
QWEN = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=64, intermediate=32, num_experts=8)
GPT_OSS = MoEConfig.from_preset("gpt-oss-120b").scaled(hidden=64, intermediate=32, num_experts=8)

# Layer output vs the fp32 layer with unquantized weights (DeepSeek-style test layer, x ~ N(0, 1)).
# rel = ||y - y_ref|| / ||y_ref|| (Frobenius), cos = cosine similarity of the flattened outputs.
# Measured over 6 weight seeds (ours and plain-cast quantizers agree to 4 digits):
#   weights only:             bf16 rel 0.0029, fp8 0.047 (cos 0.9989), fp8_block 0.048 (0.9988),
#                             nvfp4 0.176 (0.9844)
#   weights + dispatched x:   fp8 0.057 (0.9984), fp8_block 0.058 (0.9983), nvfp4 0.206 (0.9788)
# Why these sizes: one e4m3 round trip of N(0, 1) weights costs ~0.027 relative (3 mantissa bits),
# nvfp4 ~0.095 (1 mantissa bit, e4m3 block scales); the layer chains three quantized matrices
# (gate, up, down), whose independent errors add in quadrature: sqrt(3) * 0.027 ~ 0.047 and
# sqrt(3) * 0.095 ~ 0.165. Bounds: ~1.25x the largest measured relative error.
BOUNDS = {  # format: (max rel error, min cosine), weights only
    "bf16": (0.004, 0.99999),
    "fp8": (0.06, 0.998),
    "fp8_block": (0.06, 0.998),
    "nvfp4": (0.22, 0.975),
}
BOUNDS_WA = {  # weights and dispatched activations quantized
    "fp8": (0.072, 0.997),
    "fp8_block": (0.072, 0.997),
    "nvfp4": (0.26, 0.965),
}

# ---- checkpoint writers ---------------------------------------------------------------------------


def _plain_quant(fmt: str, w: torch.Tensor, input_amax: float) -> dict[str, torch.Tensor]:
    """Independent of epmoe.quant: plain torch casts (nvfp4: nearest grid point by argmin)."""
    if fmt == "fp8":
        s = w.abs().max() / 448.0
        return {"weight": (w / s).to(torch.float8_e4m3fn), "weight_scale": s.reshape(()),
                "input_scale": torch.tensor(input_amax / 448.0)}
    if fmt == "fp8_block":
        N, K = w.shape
        pad = torch.nn.functional.pad(w, (0, -K % 128, 0, -N % 128))
        s = pad.unflatten(0, (-1, 128)).unflatten(2, (-1, 128)).abs().amax(dim=(1, 3)) / 448.0
        full = s.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
        return {"weight": (w / full).to(torch.float8_e4m3fn), "weight_scale_inv": s}
    g = w.abs().max() / (6 * 448.0)
    blocks = w.unflatten(-1, (-1, 16))
    bs = (blocks.abs().amax(-1) / (g * 6)).to(torch.float8_e4m3fn)
    y = blocks / (bs.float() * g).unsqueeze(-1)
    grid = torch.tensor(E2M1_VALUES)
    code = (y.abs().unsqueeze(-1) - grid).abs().argmin(-1) | ((y < 0).long() << 3)
    code = code.flatten(-2).to(torch.uint8)
    return {"weight": code[:, 0::2] | (code[:, 1::2] << 4), "weight_scale": bs, "weight_scale_2": g.reshape(()),
            "input_scale": torch.tensor(input_amax / (6 * 448.0))}


def _our_quant(fmt: str, w: torch.Tensor, input_amax: float) -> dict[str, torch.Tensor]:
    if fmt == "fp8":
        q = quantize_fp8(w)
        return {"weight": q.data, "weight_scale": q.scales.reshape(()), "input_scale": torch.tensor(input_amax / 448)}
    if fmt == "fp8_block":
        q = quantize_fp8_block_torch(w)
        return {"weight": q.data, "weight_scale_inv": q.scales}
    q = quantize_nvfp4_torch(w)
    return {"weight": q.data, "weight_scale": q.scales, "weight_scale_2": q.global_scale.reshape(()),
            "input_scale": torch.tensor(input_amax / (6 * 448.0))}


def _plain_dequant(fmt: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a checkpoint projection means, computed without epmoe (every scale multiplies)."""
    if fmt == "bf16":
        return t["weight"].float()
    if fmt == "fp8":
        return t["weight"].float() * t["weight_scale"]
    if fmt == "fp8_block":
        N, K = t["weight"].shape
        s = t["weight_scale_inv"].repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
        return t["weight"].float() * s
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    p = t["weight"]
    v = lut[torch.stack((p & 15, p >> 4), -1).flatten(-2).long()]
    return (v * t["weight_scale"].float().repeat_interleave(16, -1)) * t["weight_scale_2"]


@dataclass
class Built:
    path: Path
    cfg: MoEConfig
    fmt: str
    full: ExpertWeights  # fp32 weights before quantization, all experts
    deq: ExpertWeights  # what the checkpoint holds, dequantized without epmoe
    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    bias: torch.Tensor | None
    shared_full: SharedExperts | None
    shared_deq: SharedExperts | None
    tensors: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def _save(path: Path, tensors: dict[str, torch.Tensor], shards: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def build(path: Path, fmt: str = "bf16", cfg: MoEConfig = DS, scheme: str = "hf", quantizer: str = "ours",
          shards: int = 1, seed: int = 0, edit=None) -> Built:
    """Write layer LAYER (and a dense layer 0) of a checkpoint; `edit(tensors)` may corrupt it."""
    g = torch.Generator().manual_seed(seed)
    E, H, I = cfg.num_experts, cfg.hidden, cfg.intermediate
    full = ExpertWeights.random(cfg, E, generator=g)
    gate = (torch.randn(E, H, generator=g) / H**0.5).to(torch.bfloat16)
    bias = torch.randn(E, generator=g) * 0.1 if cfg.uses_correction_bias else None
    shared = SharedExperts.random(cfg, generator=g) if cfg.shared_experts else None
    quant = _our_quant if quantizer == "ours" else _plain_quant
    amax_x = 4.5  # calibrated input amax for static input scales (x ~ N(0, 1))

    def proj(w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"weight": w.to(torch.bfloat16)} if fmt == "bf16" else quant(fmt, w, amax_x)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.zeros(4, H),
                                  "model.layers.0.mlp.gate_proj.weight": torch.zeros(I, H)}
    moe = f"model.layers.{LAYER}.{'block_sparse_moe' if scheme == 'mixtral' else 'mlp'}"
    names = ("w1", "w3", "w2") if scheme == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    deq13, deq2 = [], []
    if scheme in ("fused", "gpt_oss"):
        w13, w2 = full.w13.to(torch.bfloat16), full.w2.to(torch.bfloat16)
        deq13, deq2 = w13.float(), w2.float()
        if scheme == "gpt_oss":  # HF GPT-OSS: [E, H, 2I] with gate/up interleaved, down [E, I, H]
            inter = torch.stack((w13[:, :I], w13[:, I:]), dim=2).flatten(1, 2)  # rows g0 u0 g1 u1 ...
            t[f"{moe}.experts.gate_up_proj"] = inter.transpose(1, 2)
            t[f"{moe}.experts.down_proj"] = w2.transpose(1, 2)
            t[f"{moe}.experts.gate_up_proj_bias"] = torch.stack((full.b13[:, :I], full.b13[:, I:]), 2).flatten(1)
            t[f"{moe}.experts.down_proj_bias"] = full.b2
        else:
            t[f"{moe}.experts.gate_up_proj"], t[f"{moe}.experts.down_proj"] = w13, w2
    else:
        for e in range(E):
            parts = {names[0]: full.w13[e, :I], names[1]: full.w13[e, I:], names[2]: full.w2[e]}
            got = {}
            for n, w in parts.items():
                got[n] = proj(w)
                t.update({f"{moe}.experts.{e}.{n}.{k}": v for k, v in got[n].items()})
            deq13.append(torch.cat([_plain_dequant(fmt, got[names[0]]), _plain_dequant(fmt, got[names[1]])]))
            deq2.append(_plain_dequant(fmt, got[names[2]]))
        deq13, deq2 = torch.stack(deq13), torch.stack(deq2)
    router = "router" if scheme == "gpt_oss" else "gate"
    t[f"{moe}.{router}.weight"] = gate
    gate_bias = None
    if scheme == "gpt_oss":
        gate_bias = torch.randn(E, generator=g) * 0.1
        t[f"{moe}.router.bias"] = gate_bias
    if bias is not None:
        t[f"{moe}.gate.e_score_correction_bias"] = bias
    shared_deq = None
    if shared is not None:
        S = cfg.shared_width
        sp = {"gate_proj": proj(shared.w13[:S]), "up_proj": proj(shared.w13[S:]), "down_proj": proj(shared.w2)}
        for n, d in sp.items():
            t.update({f"{moe}.shared_experts.{n}.{k}": v for k, v in d.items()})
        gate_up = [_plain_dequant(fmt, sp["gate_proj"]), _plain_dequant(fmt, sp["up_proj"])]
        shared_deq = SharedExperts(torch.cat(gate_up), _plain_dequant(fmt, sp["down_proj"]))
    if edit is not None:
        edit(t)
    deq = ExpertWeights(deq13, deq2, full.b13, full.b2)
    return Built(_save(path, t, shards), cfg, fmt, full, deq, gate, gate_bias, bias, shared, shared_deq, t)


def _inputs(cfg: MoEConfig, tokens: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, cfg.hidden, generator=torch.Generator().manual_seed(seed))


def _reference(b: Built, x: torch.Tensor, weights: ExpertWeights, shared: SharedExperts | None) -> torch.Tensor:
    logits = x @ b.gate.float().T + (b.gate_bias if b.gate_bias is not None else 0)
    r = route(logits, b.cfg, b.bias)
    y = naive_moe(x, r.ids, r.weights, weights, b.cfg)
    return y if shared is None else y + shared(x, b.cfg)


def _metrics(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = float((y - ref).norm() / ref.norm())
    cos = float(torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0))
    return rel, cos


# ---- multi-rank loading ---------------------------------------------------------------------------


def _rank_load(group, cases: list[tuple[str, MoEConfig]], x: torch.Tensor) -> list[dict]:
    out = []
    for path, cfg in cases:
        ck = load_moe_layer(path, cfg, LAYER, rank=group.rank, world=group.world)
        # the module docstring's example: the layer computes its logits from gate (+ gate_bias)
        layer = MoELayer(cfg, ck.experts, group if group.world > 1 else None, layout="tp" if group.world > 1 else "dp",
                         gate=ck.gate, gate_bias=ck.gate_bias, correction_bias=ck.correction_bias, shared=ck.shared)
        xs = x[:, : cfg.hidden]
        w = ck.experts
        out.append({
            "ids": ck.expert_ids, "format": ck.format, "y": layer(xs),
            "w13": w.w13.dequantize() if ck.format != "bf16" else w.w13.float(),
            "w2": w.w2.dequantize() if ck.format != "bf16" else w.w2.float(),
            "b13": w.b13, "b2": w.b2, "gate": ck.gate, "bias": ck.correction_bias,
            "shared": None if ck.shared is None else (ck.shared.w13.float(), ck.shared.w2.float()),
            "input_scales": ck.input_scales,
        })
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("ckpt")
    specs = {
        "bf16": dict(fmt="bf16"),
        "fp8": dict(fmt="fp8", shards=3),
        "fp8_block": dict(fmt="fp8_block", shards=2),
        "fp8_block_plain": dict(fmt="fp8_block", quantizer="plain"),
        "fp8_block_i192": dict(fmt="fp8_block", cfg=DS_I192, shards=2),
        "nvfp4": dict(fmt="nvfp4", shards=2),
        "nvfp4_plain": dict(fmt="nvfp4", quantizer="plain"),
        "fp8_plain": dict(fmt="fp8", quantizer="plain"),
        "mixtral": dict(cfg=MIXTRAL, scheme="mixtral"),
        "fused_v5": dict(cfg=QWEN, scheme="fused"),
        "gpt_oss": dict(cfg=GPT_OSS, scheme="gpt_oss", shards=2),
    }
    return {name: build(root / name, **kw) for name, kw in specs.items()}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_load_every_format_at_world(built, world):
    names = list(built)
    x = _inputs(DS)  # the widest hidden; each case takes its first H columns
    results = run_ranks(_rank_load, world, args=([(str(built[n].path), built[n].cfg) for n in names], x))
    for i, name in enumerate(names):
        b = built[name]
        placement = Placement.contiguous(b.cfg.num_experts, world)
        xs = x[:, : b.cfg.hidden]
        for rank, per_case in enumerate(results):
            got = per_case[i]
            ids = placement.global_ids(rank)
            assert torch.equal(got["ids"], ids), name  # exactly this rank's experts, in local order
            assert got["format"] == (b.fmt if name not in ("mixtral", "fused_v5", "gpt_oss") else "bf16")
            assert torch.equal(got["w13"], b.deq.w13[ids]), name  # loading (and dequant) is exact
            assert torch.equal(got["w2"], b.deq.w2[ids]), name
            if b.full.b13 is not None:
                assert torch.equal(got["b13"], b.full.b13[ids]) and torch.equal(got["b2"], b.full.b2[ids])
            assert torch.equal(got["gate"], b.gate)
            if b.bias is not None:
                assert torch.equal(got["bias"], b.bias)
            if b.shared_deq is not None:
                assert torch.equal(got["shared"][0], b.shared_deq.w13)
                assert torch.equal(got["shared"][1], b.shared_deq.w2)
        # Every rank returns the same all-reduced output; it is the layer over the checkpoint's
        # weights (fp32 summation order differs) and within the format's bound of the fp32 layer.
        y_ckpt = _reference(b, xs, b.deq, b.shared_deq)
        y_full = _reference(b, xs, b.full, b.shared_full)
        for per_case in results:
            y = per_case[i]["y"]
            torch.testing.assert_close(y, y_ckpt, rtol=1e-4, atol=1e-4)
            rel, cos = _metrics(y, y_full)
            max_rel, min_cos = BOUNDS[b.fmt]
            assert rel < max_rel and cos > min_cos, (name, rel, cos)


def test_our_quantizer_and_plain_casts_agree(built):
    """The fp8 checkpoints written by epmoe.quant and by plain torch casts hold the same bytes."""
    for fmt in ("fp8", "fp8_block"):
        ours, plain = built[fmt].tensors, built[f"{fmt}_plain"].tensors
        for name, t in ours.items():
            assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                               plain[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else plain[name]), name
    # nvfp4: the plain argmin rounds ties down, ours to even; all other codes agree
    a, b = built["nvfp4"].tensors, built["nvfp4_plain"].tensors
    w = "model.layers.3.mlp.experts.0.gate_proj.weight"
    assert torch.equal(a[w.replace("weight", "weight_scale")].view(torch.uint8),
                       b[w.replace("weight", "weight_scale")].view(torch.uint8))
    assert (a[w] == b[w]).float().mean() > 0.999


# ---- error table (docs/formats.md) -------------------------------------------------------------------


def test_error_table(built):
    """Weights-only and weights + dispatched activations quantized, at world 1. The activation
    rows use the format's wire quantization (fp8 and nvfp4: the static input scale, layer max)."""
    x = _inputs(DS, tokens=64, seed=5)
    rows = []
    for fmt in ("bf16", "fp8", "fp8_block", "nvfp4"):
        b = built[fmt]
        ck = load_moe_layer(b.path, DS, LAYER)
        y_full = _reference(b, x, b.full, b.shared_full)
        y_w = _reference(b, x, b.deq, b.shared_deq)
        rel_w, cos_w = _metrics(y_w, y_full)
        assert rel_w < BOUNDS[fmt][0] and cos_w > BOUNDS[fmt][1]
        if fmt == "bf16":
            rows.append((fmt, rel_w, cos_w, None, None))
            continue
        scale = ck.input_scales["w13"].max() if ck.input_scales else None
        xq = quantize_activations(x, fmt, scale).dequantize()
        r = route(x @ b.gate.float().T, DS, b.bias)  # routing on the unquantized tokens
        y_wa = naive_moe(xq, r.ids, r.weights, b.deq, DS) + b.shared_deq(x, DS)
        rel_wa, cos_wa = _metrics(y_wa, y_full)
        assert rel_wa < BOUNDS_WA[fmt][0] and cos_wa > BOUNDS_WA[fmt][1], (fmt, rel_wa, cos_wa)
        rows.append((fmt, rel_w, cos_w, rel_wa, cos_wa))
    print("\n| format | rel (W) | cos (W) | rel (W+A) | cos (W+A) |")
    for fmt, a, b_, c, d in rows:
        wa = "- | -" if c is None else f"{c:.4f} | {d:.6f}"
        print(f"| {fmt} | {a:.4f} | {b_:.6f} | {wa} |")


# ---- bad input -------------------------------------------------------------------------------------


def _del(name):
    return lambda t: t.pop(name)


def test_missing_tensor_names_tensor_and_only_needed_ones_are_read(tmp_path):
    missing = f"model.layers.{LAYER}.mlp.experts.3.up_proj.weight_scale_inv"
    b = build(tmp_path, "fp8_block", edit=_del(missing), shards=2)
    with pytest.raises(ValueError, match=rf"{missing}.*missing"):
        validate_layer(b.path, DS, LAYER)  # the header check sees every expert
    with pytest.raises(ValueError, match=rf"{missing}.*missing from checkpoint .*index\.json"):
        load_moe_layer(b.path, DS, LAYER, rank=0, world=2)  # rank 0 owns experts 0..3
    ck = load_moe_layer(b.path, DS, LAYER, rank=1, world=2)  # rank 1 never reads expert 3
    assert ck.expert_ids.tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize(("edit", "match"), [
    (lambda t: t.__setitem__(f"model.layers.{LAYER}.mlp.experts.1.down_proj.weight",
                             torch.zeros(192, 64, dtype=torch.float8_e4m3fn)),
     r"experts\.1\.down_proj\.weight in .*model\.safetensors: shape \[192, 64\], expected \[192, 128\]"),
    (lambda t: t.__setitem__(f"model.layers.{LAYER}.mlp.experts.0.gate_proj.weight_scale_inv",
                             torch.ones(1, 2, dtype=torch.bfloat16)),
     r"experts\.0\.gate_proj\.weight_scale_inv in .*: dtype BF16, expected F32"),
    (lambda t: t[f"model.layers.{LAYER}.mlp.experts.2.up_proj.weight_scale_inv"].__setitem__((0, 1), float("nan")),
     r"experts\.2\.up_proj\.weight_scale_inv in .*NaN or inf"),
    (lambda t: t[f"model.layers.{LAYER}.mlp.experts.2.up_proj.weight_scale_inv"].__setitem__((0, 0), 0.0),
     r"experts\.2\.up_proj\.weight_scale_inv in .*zero or negative"),
    (lambda t: t.__setitem__(f"model.layers.{LAYER}.mlp.experts.0.gate_proj.weight_scale_inv", torch.ones(1, 2, 1)),
     r"shape \[1, 2, 1\], expected \[1, 2\]"),
])
def test_bad_fp8_block_tensors(tmp_path, edit, match):
    b = build(tmp_path, "fp8_block", edit=edit)
    with pytest.raises(ValueError, match=match):
        load_moe_layer(b.path, DS, LAYER)


@pytest.mark.parametrize("scheme", ["hf", "fused"])
def test_bf16_weights_holding_nan_or_inf_fail_at_load_unless_unchecked(tmp_path, scheme):
    if scheme == "fused":
        name, where = f"model.layers.{LAYER}.mlp.experts.down_proj", (5, 0, 0)
    else:
        name, where = f"model.layers.{LAYER}.mlp.experts.5.down_proj.weight", (0, 0)
    b = build(tmp_path, "bf16", scheme=scheme, edit=lambda t: t[name].__setitem__(where, float("nan")))
    with pytest.raises(ValueError, match=r"expert 5's w2 \(down\) weights hold NaN or inf.*check_finite=False"):
        load_moe_layer(b.path, DS, LAYER, rank=1, world=2)  # rank 1 owns experts 4..7
    assert load_moe_layer(b.path, DS, LAYER, rank=0, world=2).expert_ids.tolist() == [0, 1, 2, 3]
    w = load_moe_layer(b.path, DS, LAYER, rank=1, world=2, check_finite=False).experts.w2
    assert bool(torch.isnan(w.float()).any())


def test_bad_nvfp4_global_scale(tmp_path):
    name = f"model.layers.{LAYER}.mlp.experts.4.down_proj.weight_scale_2"
    b = build(tmp_path, "nvfp4", edit=lambda t: t.__setitem__(name, torch.tensor(0.0)))
    with pytest.raises(ValueError, match=rf"{name} in .*zero or negative"):
        load_moe_layer(b.path, DS, LAYER, rank=1, world=2)


def test_zero_input_scale_falls_back_to_layer_max(tmp_path):
    def edit(t):
        for e in (1, 5):
            t[f"model.layers.{LAYER}.mlp.experts.{e}.gate_proj.input_scale"] = torch.tensor(0.0)
            t[f"model.layers.{LAYER}.mlp.experts.{e}.up_proj.input_scale"] = torch.tensor(0.0)
        t[f"model.layers.{LAYER}.mlp.experts.6.up_proj.input_scale"] = torch.tensor(0.01)  # the layer max

    b = build(tmp_path, "nvfp4", edit=edit)
    with pytest.warns(UserWarning, match=r"experts \[5\] have a zero w13 input_scale"):
        ck = load_moe_layer(b.path, DS, LAYER, rank=1, world=2)
    s = ck.input_scales["w13"]  # experts 4..7
    assert s[1] == pytest.approx(0.01) and s[2] == pytest.approx(0.01) and s[0] == pytest.approx(4.5 / 2688)
    assert torch.isfinite(quantize_activations(_inputs(DS), "nvfp4", s.max()).dequantize()).all()
    with pytest.warns(UserWarning, match=r"experts \[1\]"):
        load_moe_layer(b.path, DS, LAYER, rank=0, world=2)


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "fp32"), (torch.float16, "fp16")])
def test_float_checkpoints_report_their_dtype(tmp_path, dtype, name):
    """fp32 / fp16 expert tensors load as they are stored and say so (they used to report bf16);
    dtype= casts them and the format follows."""
    def cast(t):
        for k in [k for k in t if ".experts." in k]:
            t[k] = t[k].to(dtype)

    b = build(tmp_path / "a", "bf16", edit=cast)
    ck = load_moe_layer(b.path, DS, LAYER)
    assert ck.experts.w13.dtype == dtype and ck.format == ck.experts.format == name
    cast_ck = load_moe_layer(b.path, DS, LAYER, dtype=torch.bfloat16)
    assert cast_ck.experts.w13.dtype == torch.bfloat16 and cast_ck.format == "bf16"
    assert load_moe_layer(build(tmp_path / "b", "bf16").path, DS, LAYER, dtype=dtype).format == name


def test_not_divisible_unrecognised_and_mismatched(tmp_path):
    b = build(tmp_path / "a", "bf16")
    assert validate_layer(b.path, DS, LAYER) == "bf16"
    with pytest.raises(ValueError, match="8 experts, not divisible by the EP world size 3"):
        load_moe_layer(b.path, DS, LAYER, rank=0, world=3)
    with pytest.raises(ValueError, match="cannot recognise MoE layer 0"):
        load_moe_layer(b.path, DS, 0)
    with pytest.raises(ValueError, match="has 8 experts, MoEConfig.num_experts is 16"):
        load_moe_layer(b.path, DS.replace(num_experts=16), LAYER)
    with pytest.raises(ValueError, match="shape .* expected"):
        load_moe_layer(b.path, DS.replace(intermediate=64), LAYER)

    def int8(t):
        for k in [k for k in t if ".experts." in k]:
            t[k] = t[k].to(torch.int8)

    c = build(tmp_path / "b", "bf16", edit=int8)
    with pytest.raises(ValueError,
                       match=r"experts\.0\.gate_proj\.weight in .*cannot recognise the weight format \(dtype I8"):
        load_moe_layer(c.path, DS, LAYER)
    with pytest.raises(ValueError, match="does not exist"):
        load_moe_layer(tmp_path / "nope.safetensors", DS, LAYER)


def test_runners_prepare_weights():
    w = ExpertWeights.random(QWEN, 2)
    assert get_runner("reference").prepare(w, QWEN) is w
    t = get_runner("triton").prepare(ExpertWeights(w.w13.transpose(1, 2).contiguous().transpose(1, 2), w.w2), QWEN)
    assert t.w13.is_contiguous() and torch.equal(t.w13, w.w13)
    # weights quantized by epmoe.quant already have the kernels' layout: nothing changes
    for fmt in ("fp8", "fp8_block", "nvfp4"):
        q = ExpertWeights(quantize_weights(w.w13, fmt), quantize_weights(w.w2, fmt))
        t = get_runner("triton").prepare(q, QWEN)
        for name, N, K in (("w13", 2 * QWEN.intermediate, QWEN.hidden), ("w2", QWEN.hidden, QWEN.intermediate)):
            _check_quantized(name, getattr(t, name), 2, N, K)
            assert torch.equal(getattr(t, name).dequantize(), getattr(q, name).dequantize()), (fmt, name)


def test_load_defaults_to_the_auto_runner(built, monkeypatch):
    asked = []
    monkeypatch.setattr(checkpoint_module, "pick_runner", lambda *a: asked.append(a) or "reference")
    load_moe_layer(built["fp8"].path, DS, LAYER)
    assert asked == [("cpu", "fp8")]  # CPU: the reference layout, as before


# ---- the triton runner's layout for quantized checkpoints -------------------------------------------

QUANTIZED = ["fp8", "fp8_plain", "fp8_block", "fp8_block_plain", "fp8_block_i192", "nvfp4", "nvfp4_plain"]


def _tile_scales(w) -> torch.Tensor:
    """The scale each value of a triton-layout weight is multiplied by (nvfp4: block scale x global)."""
    E, N, K = w.shape
    if w.format == "fp8":
        return w.scales.expand(E, N, K)
    if w.format == "fp8_block":
        return w.scales.repeat_interleave(128, 1)[:, :N].repeat_interleave(128, 2)[:, :, :K]
    return w.scales.float().repeat_interleave(16, 2) * w.global_scale


def _check_requantization(fmt: str, ref, tri) -> float:
    """Triton-layout weight `tri` against the reference-layout `ref` (the checkpoint's exact
    values): equal where the scale did not change, else within the documented bound (half a
    step of the format at the merged scale). Returns the fraction of values that changed."""
    a, b = ref.dequantize(), tri.dequantize()
    s = _tile_scales(tri)
    if fmt == "nvfp4":
        bound = torch.maximum(s / 4, a.abs() / 4)  # half an e2m1 step
    else:
        bound = torch.maximum(a.abs() * 2**-4, s * 2**-10)  # half an e4m3 step (normal / subnormal)
        # values whose row scale already was the tile's scale keep their bytes
        E, N, K = a.shape
        rows = _scale_rows(ref)  # [E, N, Kb]
        cols = K if rows.shape[2] == 1 else 128
        same = (rows.repeat_interleave(cols, 2)[:, :, :K] == s)
        assert torch.equal(a[same], b[same])
    assert bool(((a - b).abs() <= bound * (1 + 1e-6)).all())
    return float((a != b).float().mean())


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", QUANTIZED)
def test_triton_layout_of_quantized_checkpoints(built, name, world):
    """runner="triton" preprocessing: every quantized checkpoint loads into the layout the Triton
    kernels read (their own check accepts it) with the checkpoint's values, or within the stated
    requantization bound where gate and up scales had to be merged."""
    b = built[name]
    cfg, I, H = b.cfg, b.cfg.intermediate, b.cfg.hidden
    for rank in range(world):
        ref = load_moe_layer(b.path, cfg, LAYER, rank=rank, world=world, runner="reference")
        tri = load_moe_layer(b.path, cfg, LAYER, rank=rank, world=world, runner="triton")
        E = cfg.num_experts // world
        assert torch.equal(tri.expert_ids, ref.expert_ids)
        for wname, N, K in (("w13", 2 * I, H), ("w2", H, I)):
            r, t = getattr(ref.experts, wname), getattr(tri.experts, wname)
            _check_quantized(wname, t, E, N, K)
            changed = _check_requantization(b.fmt, r, t)
            if wname == "w2" or (b.fmt == "fp8_block" and I % 128 == 0):
                assert changed == 0, (name, wname)  # already on the kernels' grid: nothing changes
            if wname == "w13" and b.fmt == "fp8_block" and I % 128:
                assert r.block == (1, 1, 128) and t.block == (1, 128, 128)  # per-row scales -> 128 grid
                assert changed > 0


def test_triton_layout_is_exact_where_scales_agree(tmp_path):
    """fp8 with equal gate/up scales keeps every byte; nvfp4 whose up global is twice gate's
    folds the factor into gate's block scales exactly."""
    moe = f"model.layers.{LAYER}.mlp.experts"

    def same_fp8(t):
        for e in range(DS.num_experts):
            t[f"{moe}.{e}.up_proj.weight_scale"] = t[f"{moe}.{e}.gate_proj.weight_scale"].clone()

    def pow2_nvfp4(t):
        for e in range(DS.num_experts):
            t[f"{moe}.{e}.up_proj.weight_scale_2"] = 2 * t[f"{moe}.{e}.gate_proj.weight_scale_2"]

    for fmt, edit in (("fp8", same_fp8), ("nvfp4", pow2_nvfp4)):
        b = build(tmp_path / fmt, fmt, edit=edit)
        ref = load_moe_layer(b.path, DS, LAYER, runner="reference").experts.w13
        tri = load_moe_layer(b.path, DS, LAYER, runner="triton").experts.w13
        assert torch.equal(tri.dequantize(), ref.dequantize()), fmt
        if fmt == "fp8":
            assert torch.equal(tri.data.view(torch.uint8), ref.data.view(torch.uint8))
            assert tuple(tri.scales.shape) == (DS.num_experts, 1, 1)
        else:
            assert tuple(ref.global_scale.shape) == (DS.num_experts, 2 * DS.intermediate, 1)
            assert tuple(tri.global_scale.shape) == (DS.num_experts, 1, 1)


@pytest.mark.parametrize("name", ["fp8", "fp8_block_i192", "nvfp4"])
def test_triton_runner_reads_the_preprocessed_checkpoint(built, name):
    """The Triton runner (interpreter on the CPU, fp32 activations) over the triton-layout
    weights equals the reference runner over the same weights."""
    b = built[name]
    cfg = b.cfg
    ck = load_moe_layer(b.path, cfg, LAYER, rank=1, world=2, runner="triton")
    E = cfg.num_experts // 2
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, cfg.hidden, generator=g)
    experts = torch.tensor([0, 3, 1, -1, 2, 3], dtype=torch.int32)
    rows = torch.tensor([0, 0, 1, 0, 2, 3], dtype=torch.int32)
    d = Dispatched(hidden, rows, experts, count_experts(experts, E))
    got = get_runner("triton")(cfg, ck.experts)(d)
    want = reference_experts(hidden, rows, experts, ck.experts, cfg, out_dtype=torch.float32)
    valid = experts >= 0
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)


# ---- unreadable files --------------------------------------------------------------------------------


def test_corrupt_file_names_the_file_and_the_fix(built, tmp_path):
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file" * 8)
    with pytest.raises(ValueError, match=r"garbage/model\.safetensors is not a readable safetensors file .*re-"):
        load_moe_layer(bad, DS, LAYER)
    # a truncated shard of a sharded checkpoint: named with the index that lists it
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in built["fp8"].path.iterdir():
        (sharded / f.name).write_bytes(f.read_bytes())
    shard = sharded / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors \(listed in .*index\.json\) is not a "
                                         r"readable safetensors file"):
        load_moe_layer(sharded, DS, LAYER)


# ---- real public layouts (header only) -------------------------------------------------------------

# deepseek-ai/DeepSeek-V3 (model.safetensors.index.json names; shapes from config.json: hidden
# 7168, moe_intermediate_size 2048, 256 routed experts, 1 shared expert; quantization_config
# fmt e4m3, weight_block_size [128, 128]). Layer 3 is the first MoE layer (first_k_dense_replace 3).
# nvidia/DeepSeek-R1-FP4 (ModelOpt NVFP4, group_size 16): same architecture, experts stored as
# U8 [N, K/2] + F8_E4M3 weight_scale [N, K/16] + F32 scalar weight_scale_2 and input_scale.
DEEPSEEK_V3_PROJ = {
    "fp8_block": {
        "gate_proj": {"weight": ("F8_E4M3", [2048, 7168]), "weight_scale_inv": ("F32", [16, 56])},
        "up_proj": {"weight": ("F8_E4M3", [2048, 7168]), "weight_scale_inv": ("F32", [16, 56])},
        "down_proj": {"weight": ("F8_E4M3", [7168, 2048]), "weight_scale_inv": ("F32", [56, 16])},
    },
    "nvfp4": {
        "gate_proj": {"weight": ("U8", [2048, 3584]), "weight_scale": ("F8_E4M3", [2048, 448]),
                      "weight_scale_2": ("F32", []), "input_scale": ("F32", [])},
        "up_proj": {"weight": ("U8", [2048, 3584]), "weight_scale": ("F8_E4M3", [2048, 448]),
                    "weight_scale_2": ("F32", []), "input_scale": ("F32", [])},
        "down_proj": {"weight": ("U8", [7168, 1024]), "weight_scale": ("F8_E4M3", [7168, 128]),
                      "weight_scale_2": ("F32", []), "input_scale": ("F32", [])},
    },
}


def real_layout(fmt: str) -> dict[str, tuple[str, list[int]]]:
    moe = "model.layers.3.mlp"
    out = {f"{moe}.gate.weight": ("BF16", [256, 7168]), f"{moe}.gate.e_score_correction_bias": ("F32", [256]),
           "model.layers.3.input_layernorm.weight": ("BF16", [7168])}
    for owner in [f"experts.{e}" for e in range(256)] + ["shared_experts"]:
        for p, ts in DEEPSEEK_V3_PROJ[fmt].items():
            out.update({f"{moe}.{owner}.{p}.{k}": v for k, v in ts.items()})
    return out


class HeaderOnly(CheckpointFiles):
    """A checkpoint known only by its index: names, dtypes, shapes."""

    def __init__(self, header: dict[str, tuple[str, list[int]]]) -> None:
        self.header = header
        self.files = dict.fromkeys(header, Path("model-00001-of-000163.safetensors"))
        self.origin = Path("model.safetensors.index.json")
        self._handles, self._stack = {}, None

    def info(self, name):
        if name not in self.header:
            raise ValueError(f"tensor {name!r} is missing from checkpoint {self.origin}")
        dt, shape = self.header[name]
        return dt, tuple(shape)

    def close(self):
        pass


def _pattern(name: str) -> str:
    return ".".join("{e}" if p.isdigit() and i > 3 else p for i, p in enumerate(name.split(".")))


@pytest.mark.parametrize("fmt", ["fp8_block", "nvfp4"])
def test_real_deepseek_layout(built, fmt):
    full = MoEConfig.from_preset("deepseek-v3")
    header = real_layout(fmt)
    assert validate_layer(HeaderOnly(header), full, 3) == fmt
    # our small test checkpoints use exactly the real names (expert index aside)
    small = {_pattern(n) for n in built[fmt].tensors if n.startswith("model.layers.3.")}
    assert small == {_pattern(n) for n in header if ".mlp." in n}
    # one wrong shape among 256 experts is found, named with its file
    bad = dict(header)
    name = "model.layers.3.mlp.experts.201.down_proj.weight"
    bad[name] = (header[name][0], [7168, 1000])
    with pytest.raises(ValueError, match=r"experts\.201\.down_proj\.weight in model-00001-of-000163\.safetensors: "):
        validate_layer(HeaderOnly(bad), full, 3)

