"""Hugging Face transformers (v5) drop-in: run a model's MoE blocks on `MoELayer`.

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).to("cuda")
    patch_model(model)                              # one process, every expert
    patch_model(model, group=EPGroup())             # EP: each rank keeps its E/W experts

Each MoE block becomes an `HFMoEBlock`: same forward signature and return value, the HF router
module kept under its name (`output_router_logits` still records it), its picks (or logits) handed
to an `MoELayer` holding the block's expert weights in the block's dtype:

    logits, scores, ids = router(x)               # the HF router module, as the HF block calls it
    y = moe(x, routing=Routing.external(ids, scores))   # picks="hf": HF's experts, ties included
    y = moe(x, logits)                            # picks="logits": epmoe.route (graph-capturable)

Families (`FAMILIES`: Mixtral, Qwen2/3-MoE, Qwen3-Next, DeepSeek-V2/V3 and the models sharing their
router, MiniMax-M2, OLMoE, Granite-MoE, Jamba, GPT-OSS and more) and those left out with the reason,
weight layouts, why "hf" picks are the default (bf16 ties), numerics and limits (inference only;
patch after `model.to`): docs/hf.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from epmoe.checkpoint import gpt_oss_experts
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights
from epmoe.group import Placement, RankGroup
from epmoe.layer import MoELayer, SharedExperts
from epmoe.quant import FORMATS as QUANT_FORMATS
from epmoe.quant import quantize_weights
from epmoe.routing import Routing

# MoELayer arguments that patch_model derives from the model; passing them is an error.
_DERIVED = ("gate", "correction_bias", "shared")
# Where a patched block's routing comes from (see the module docstring).
PICKS = ("hf", "logits")


@dataclass(frozen=True)
class _Family:
    """One supported model family."""

    name: str  # the HF `model_type` (and transformers module: models/<name>/modeling_<name>.py)
    title: str  # the family as people write it
    block: str  # class name of its MoE block
    router: str = "gate"  # attribute of the block holding the router module
    returns_scores: bool = False  # the block returns (hidden, router_scores) instead of hidden
    shared: str | None = None  # attribute of the block holding its shared-expert MLP (gate/up/down_proj)
    shared_gate: str | None = None  # attribute of the Linear [1, H] whose sigmoid scales the shared MLP
    bias: str | None = None  # the block's correction-bias buffer [E], passed as router(x, bias) (MiniMax-M2)
    router_3d: bool = False  # the router takes [B, S, H] hidden states (AFMoE), not [T, H]
    router_cls: str | None = None  # the router class the block must hold (older Jamba: a bare nn.Linear)
    block_scales: bool = False  # the block, not the router, multiplies the routed output by the scaling factor

    @property
    def module(self) -> str:
        return f"transformers.models.{self.name}.modeling_{self.name}"


# Each router returns (logits [T, E], weights [T, K], ids [T, K]); the routing each one computes and
# the config fields it reads are in config.py (_HF_MAPPINGS), the families left out in docs/hf.md.
FAMILIES: dict[str, _Family] = {f.name: f for f in (
    _Family("mixtral", "Mixtral", "MixtralSparseMoeBlock"),
    _Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeSparseMoeBlock", shared="shared_expert",
            shared_gate="shared_expert_gate"),
    _Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeSparseMoeBlock"),
    _Family("qwen3_next", "Qwen3-Next", "Qwen3NextSparseMoeBlock", shared="shared_expert",
            shared_gate="shared_expert_gate"),
    _Family("deepseek_v2", "DeepSeek-V2", "DeepseekV2Moe", shared="shared_experts"),
    _Family("deepseek_v3", "DeepSeek-V3", "DeepseekV3MoE", shared="shared_experts"),
    _Family("glm4_moe", "GLM-4-MoE", "Glm4MoeMoE", shared="shared_experts"),
    _Family("glm4_moe_lite", "GLM-4-MoE-Lite", "Glm4MoeLiteMoE", shared="shared_experts"),
    _Family("dots1", "dots.llm1", "Dots1MoE", shared="shared_experts"),
    _Family("minicpm5_moe", "MiniCPM5-MoE", "MiniCPM5MoeMoE", shared="shared_experts"),
    _Family("solar_open", "Solar-Open", "SolarOpenMoE", shared="shared_experts"),
    _Family("exaone_moe", "EXAONE-MoE", "ExaoneMoeSparseMoEBlock", shared="shared_experts"),
    _Family("mimo_v2_flash", "MiMo-V2-Flash", "MiMoV2FlashMoE"),
    _Family("hunyuan_v1_moe", "Hunyuan-V1-MoE", "HunYuanMoEV1Moe", shared="shared_mlp"),
    _Family("olmoe", "OLMoE", "OlmoeSparseMoeBlock"),
    _Family("flex_olmo", "FlexOlmo", "FlexOlmoSparseMoeBlock"),
    _Family("mellum", "Mellum", "MellumSparseMoeBlock"),
    _Family("lara_mini", "Lara-Mini", "LaraMiniSparseMoeBlock", shared="shared_expert"),
    _Family("flint", "Flint", "FlintSparseMoeBlock", shared="shared_expert"),
    _Family("laguna", "Laguna", "LagunaSparseMoeBlock", shared="shared_experts", block_scales=True),
    _Family("minimax", "MiniMax-Text-01", "MiniMaxSparseMoeBlock"),
    _Family("jamba", "Jamba", "JambaSparseMoeBlock", router="router", router_cls="JambaTopKRouter"),
    _Family("minimax_m2", "MiniMax-M2", "MiniMaxM2SparseMoeBlock", bias="e_score_correction_bias"),
    _Family("hy_v3", "Hy3", "HYV3MoE", shared="shared_experts", bias="e_score_correction_bias"),
    _Family("afmoe", "AFMoE", "AfmoeSparseMoeBlock", router="router", shared="shared_experts", bias="expert_bias",
            router_3d=True),
    _Family("lfm2_moe", "LFM2-MoE", "Lfm2MoeSparseMoeBlock", bias="expert_bias"),
    _Family("granitemoe", "Granite-MoE", "GraniteMoeMoE", router="router"),
    _Family("granitemoeshared", "Granite-MoE-Shared", "GraniteMoeSharedMoE", router="router"),
    _Family("granitemoe_swa", "Granite-MoE-SWA", "GraniteMoeSWAMoE", router="router"),
    _Family("granitemoehybrid", "Granite-MoE-Hybrid", "GraniteMoeHybridMoE", router="router"),
    _Family("gpt_oss", "GPT-OSS", "GptOssMLP", router="router", returns_scores=True),
)}


def config_from_hf(hf_config: Any) -> MoEConfig:
    """The `MoEConfig` of the MoE layers of a transformers config (`model.config`): `MoEConfig.from_hf`."""
    return MoEConfig.from_hf(hf_config)


def _block_config(cfg: MoEConfig, experts: Any) -> MoEConfig:
    """GPT-OSS experts clamp and scale with the module's own `limit` and `alpha` (docs/hf.md)."""
    if cfg.activation == "swiglu_clamped" and hasattr(experts, "limit") and hasattr(experts, "alpha"):
        return cfg.replace(swiglu_limit=float(experts.limit), swiglu_alpha=float(experts.alpha))
    return cfg


@dataclass
class GatedSharedExperts(SharedExperts):
    """Qwen2-MoE's shared expert, scaled per token by a sigmoid gate.

    w13: [2S, H] gate rows then up rows; w2: [H, S]; gate: [1, H] (`shared_expert_gate.weight`).
    out = sigmoid(x @ gate.T) * w2 @ act(w13 @ x), in fp32 (MoELayer adds it before its one cast).
    """

    gate: torch.Tensor

    def __call__(self, x: torch.Tensor, cfg: MoEConfig, out: torch.Tensor | None = None) -> torch.Tensor:
        scale = torch.sigmoid(x.float() @ self.gate.float().T)  # [T, 1]
        return torch.mul(scale, super().__call__(x, cfg), out=out)  # [T, H] fp32 (into out when given)


def _rows(t: torch.Tensor, ids: torch.Tensor, own: bool) -> torch.Tensor:
    """t[ids] along dim 0: a view for a contiguous run of ids, cloned when `own` (so the full
    HF tensor can be freed once the block is replaced)."""
    t = t.detach()
    lo, n = int(ids[0]), ids.numel()
    if torch.equal(ids.cpu(), torch.arange(lo, lo + n)):
        part = t[lo : lo + n]
        return part.clone() if own else part
    return t[ids.to(t.device)]


def _expert_weights(family: _Family, experts: nn.Module, ids: torch.Tensor, own: bool) -> ExpertWeights:
    """The experts `ids` (global ids, in local order) of an HF experts module, in our layout."""
    if family.name != "gpt_oss":  # gate_up_proj [E, 2I, H], down_proj [E, H, I]: ours as they are
        return ExpertWeights(_rows(experts.gate_up_proj, ids, own), _rows(experts.down_proj, ids, own))
    # gate_up_proj [E, H, 2I] gate/up interleaved, down_proj [E, I, H]: de-interleaved and transposed
    return gpt_oss_experts(_rows(experts.gate_up_proj, ids, own=False),
                           _rows(experts.gate_up_proj_bias, ids, own=False),
                           _rows(experts.down_proj, ids, own=False), _rows(experts.down_proj_bias, ids, own))


def _shared(family: _Family, block: nn.Module, cfg: MoEConfig) -> SharedExperts | None:
    """The block's shared MLP (`family.shared`, e.g. DeepSeek-V3 `shared_experts`), scaled by its gate
    where it has one (Qwen2-MoE `shared_expert_gate`), or None."""
    if not cfg.shared_experts or family.shared is None:
        return None
    mlp = getattr(block, family.shared)
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if proj.bias is not None:
            raise ValueError(f"shared expert {type(mlp).__name__} has biases; epmoe shared experts have none")
    w13 = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])  # [2S, H]
    if family.shared_gate is not None:
        gate = getattr(block, family.shared_gate).weight.detach()
        return GatedSharedExperts(w13, mlp.down_proj.weight.detach(), gate=gate)
    return SharedExperts(w13, mlp.down_proj.weight.detach())


class HFMoEBlock(nn.Module):
    """An HF MoE block running on `MoELayer`; same forward signature and return value.

    forward(hidden_states [B, S, H]) -> [B, S, H], or (that, router_scores [B*S, K]) for GPT-OSS.
    """

    def __init__(self, family: str, router: nn.Module, moe: MoELayer, picks: str = "hf",
                 block_bias: torch.Tensor | None = None) -> None:
        super().__init__()
        _check_picks(picks)
        self.family = FAMILIES[family]
        self.router_name = self.family.router
        setattr(self, self.router_name, router)  # same state_dict key as before: mlp.gate.weight
        if self.family.bias is not None:  # MiniMax-M2: the block's buffer (None: LFM2 without one), to its router
            self.register_buffer(self.family.bias, block_bias)  # same state_dict key: mlp.e_score_correction_bias
        self.moe = moe
        self.picks = picks
        self.graphs: Any = None  # hf_graphs.BlockGraphs once capture_model_graphs runs

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.graphs is not None and self.graphs.serves(hidden_states):
            return self.graphs.replay(hidden_states)
        shape = hidden_states.shape
        out = self.body(hidden_states.reshape(-1, shape[-1]))
        return (out[0].reshape(shape), out[1]) if self.family.returns_scores else out.reshape(shape)

    def body(self, x: torch.Tensor, valid: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> y [T, H] (and router scores [T, K] where the family returns them). valid: a CUDA
        graph body's device count of real rows; rows at or past it go to no expert (hf_graphs.py)."""
        # called as the HF block calls it (router bias, fp32 for DeepSeek): `output_router_logits` records it
        args = (getattr(self, self.family.bias),) if self.family.bias is not None else ()
        router_in = x.unsqueeze(0) if self.family.router_3d else x  # [1, T, H] or [T, H]
        router = getattr(self, self.router_name)
        router_logits, router_scores, router_ids = router_outputs(router(router_in, *args))  # [T, E], [T, K] x2
        if self.family.block_scales:  # Laguna scales the routed sum after its router; ours scales the weights
            router_scores = router_scores * self.moe.cfg.routed_scaling_factor
        if self.picks == "hf":  # HF's own picks, ties included; checked only when built with validate=True
            if valid is not None:
                rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)  # [T, 1]
                router_ids = torch.where(rows < valid, router_ids, -1)
            routing = Routing.external(router_ids, router_scores, self.moe.cfg.num_experts, validate=False)
            y = self.moe(x, routing=routing) if valid is None else self.moe._eager(x, None, routing, check=False)
        else:
            logits = router_logits.reshape(x.shape[0], -1)
            y = self.moe(x, logits) if valid is None else self.moe._eager(x, logits, None, num_valid=valid)
        return (y, router_scores) if self.family.returns_scores else y

    def extra_repr(self) -> str:
        m = self.moe
        return (f"family={self.family.name}, picks={self.picks}, comm={m.combo.comm}, runner={m.combo.runner}, "
                f"layout={m.layout}")


def _correction_bias(cfg: MoEConfig, router: nn.Module, block_bias: torch.Tensor | None) -> torch.Tensor | None:
    """The [E] bias added to the sigmoid scores to pick experts: the block's (`_Family.bias`) or the router's
    `e_score_correction_bias`; zeros where the family has none (LFM2-MoE with use_expert_bias=False)."""
    if not cfg.uses_correction_bias:
        return None
    bias = block_bias if block_bias is not None else getattr(router, "e_score_correction_bias", None)
    if bias is None:
        device = next(router.parameters()).device
        return torch.zeros(cfg.num_experts, device=device)
    return bias.detach()


def router_outputs(out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, E], weights [T, K], ids [T, K]) from an HF router's return value: transformers 5.17's
    Granite-MoE routers return (ids, weights, logits), later ones and every other family (logits, weights, ids)."""
    first, weights, last = out
    return (last, weights, first) if not first.is_floating_point() else (first, weights, last)


def _check_picks(picks: str) -> None:
    if picks not in PICKS:
        raise ValueError(f"picks={picks!r} is not supported; pass one of {PICKS}")


def _family_of(module: nn.Module) -> _Family | None:
    cls = type(module)
    f = next((f for f in FAMILIES.values() if cls.__name__ == f.block and cls.__module__ == f.module), None)
    if f is not None and f.router_cls is not None and type(getattr(module, f.router, None)).__name__ != f.router_cls:
        return None  # a version of the family whose block routes itself
    return f


def _available(family: _Family) -> bool:
    """Whether the installed transformers has the family's block (and its router class) as patched here."""
    try:
        module = importlib.import_module(family.module)
    except ImportError:
        return False
    return hasattr(module, family.block) and (family.router_cls is None or hasattr(module, family.router_cls))


def patch_model(
    model: nn.Module, group: RankGroup | None = None, comm: str = "auto", runner: str = "auto",
    layout: str | None = None, quant: str | None = None, picks: str = "hf", graphs: int = 0,
    **layer_kwargs: Any,
) -> list[str]:
    """Replace every MoE block of a transformers model by an `HFMoEBlock`; return their names.

    model:  a model of a `FAMILIES` family (transformers >= 5; docs/hf.md lists them), already on its
            device and in its dtype (bf16 / fp16 / fp32).
    group:  the EP ranks (`EPGroup`, a `VirtualGroup` rank) or None for one rank; each rank keeps its
            E/W experts (contiguous, or `placement=`) and every rank runs the same number of forward calls.
    comm:   "auto": "none" for one rank or the tp layout, else MoELayer's per-call pick; or a backend name.
    runner: "auto" (select.pick_runner: triton on CUDA, reference on the CPU), "reference" or "triton".
    layout: "tp" or "dp"; default "tp" with several ranks and comm "auto" or "none" (every rank runs
            the same tokens, as with tensor-parallel attention), else "dp" (each rank its own batch).
    quant:  None keeps the model's dtype; "fp8", "fp8_block" or "nvfp4" (H, I % 16 == 0) quantizes
            this rank's routed experts (`quantize_weights`, dynamic scales); biases and shared experts stay.
    picks:  "hf": the experts and weights HF's router picked (ties as HF); "logits": `epmoe.route` on
            its logits (ties to the lowest id; what CUDA graphs replay). See docs/hf.md.
    graphs: > 0 (CUDA, one rank): each block's calls of up to this many tokens replay CUDA graphs of the
            whole block (router and layer), each power-of-two bucket captured on its first call
            (`capture_model_graphs`, hf_graphs.py; the blocks share one memory pool): a decode step costs
            one replay per block; 0: eager calls.
    layer_kwargs: further `MoELayer` arguments (placement, capture, comm_options, validate;
            replicas: one `ReplicaPlan` every layer starts from, each `rebalance`d on its own);
            `validate` defaults to False here (the model's own router; docs/hf.md).
    """
    if quant is not None and quant not in QUANT_FORMATS:
        raise ValueError(f"quant={quant!r} is not supported; pass one of {(None, *QUANT_FORMATS)} (None keeps the "
                         "expert weights in the model's dtype)")
    _check_picks(picks)
    layer_kwargs.setdefault("validate", False)
    bad = sorted(set(layer_kwargs) & set(_DERIVED))
    if bad:
        raise ValueError(f"patch_model sets {bad} itself from the model; do not pass them in layer_kwargs")
    world, rank = (group.world, group.rank) if group is not None else (1, 0)
    if layout is None:
        layout = "tp" if world > 1 and comm in ("auto", "none") else "dp"
    if comm == "auto" and (world == 1 or layout == "tp"):
        comm = "none"  # nothing moves; resolved here so the layer reports the backend it runs

    blocks = [(name, m, f) for name, m in model.named_modules() if (f := _family_of(m)) is not None]
    if not blocks:
        if any(isinstance(m, HFMoEBlock) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} is already patched (its MoE blocks are HFMoEBlock)")
        supported = ", ".join(f"{f.title} ({f.block})" for f in FAMILIES.values())
        raise ValueError(f"{type(model).__name__} has no MoE block epmoe recognises; supported families: "
                         f"{supported} (transformers >= 5)")
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError(f"{type(model).__name__} has no .config; pass the transformers model itself")
    cfg = config_from_hf(hf_config)
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    model_type = getattr(text_config, "model_type", None)  # of the text config for composite ones
    replicas = layer_kwargs.get("replicas")
    placement = None if replicas is not None else (
        layer_kwargs.pop("placement", None) or Placement.contiguous(cfg.num_experts, world))
    # [E_local] global ids of this rank's experts (of its slots: the MoELayer checks the plan)
    ids = placement.global_ids(rank) if placement is not None else replicas.rank_experts(rank)

    if graphs < 0 or graphs and (world > 1 or next(model.parameters()).device.type != "cuda"):
        raise ValueError(f"graphs={graphs}: graphs captured on first use need a model on a CUDA device and one "
                         "rank (graphs > 0), or pass graphs=0")
    names = []
    for name, block, family in blocks:
        if not name:
            raise ValueError("patch the model that holds the MoE blocks, not a block itself")
        if family.name != model_type:
            raise ValueError(f"{name} is a {family.title} block but the model config has "
                             f"model_type={model_type!r}; patch a model of one family")
        w = _expert_weights(family, block.experts, ids, own=world > 1)
        if quant is not None:
            w = ExpertWeights(quantize_weights(w.w13, quant), quantize_weights(w.w2, quant), w.b13, w.b2)
        router = getattr(block, family.router)
        block_bias = getattr(block, family.bias, None) if family.bias is not None else None
        block_bias = block_bias.detach() if block_bias is not None else None
        bias = _correction_bias(cfg, router, block_bias)
        moe = MoELayer(_block_config(cfg, block.experts), w, group=group, comm=comm, runner=runner, layout=layout,
                       placement=placement, correction_bias=bias, shared=_shared(family, block, cfg), **layer_kwargs)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, HFMoEBlock(family.name, router, moe, picks=picks, block_bias=block_bias))
        names.append(name)
    if graphs:
        capture_model_graphs(model, graphs)
    return names


def capture_model_graphs(model: nn.Module, max_tokens: int) -> int:
    """CUDA graphs of every patched block of `model` (router and layer), each power-of-two bucket up to
    max_tokens captured on its first call, all in one memory pool (`hf_graphs.BlockGraphs`); returns
    the number of blocks. What `patch_model(graphs=N)` does after patching."""
    from epmoe.integrations.hf_graphs import BlockGraphs

    pool = torch.cuda.graph_pool_handle()
    blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    for b in blocks:
        b.graphs = BlockGraphs(b, max_tokens, pool)
    return len(blocks)
