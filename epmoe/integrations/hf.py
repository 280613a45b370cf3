"""Hugging Face transformers (v5) drop-in: run a model's MoE blocks on `MoELayer`.

    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16).to("cuda")
    patch_model(model)                              # one process, every expert
    patch_model(model, group=EPGroup())             # EP: each rank keeps its E/W experts

Every MoE block is replaced by an `HFMoEBlock` that keeps the block's forward signature and
return value, keeps the HF router module (under its original attribute name, so
`output_router_logits` still records it) and hands its logits to an `MoELayer` holding the
block's expert weights in the block's dtype. How each family maps:

- Mixtral (MixtralSparseMoeBlock): softmax, top-k always renormalised; silu experts.
- Qwen2-MoE (Qwen2MoeSparseMoeBlock): softmax, `norm_topk_prob` from the config; one shared
  expert scaled per token by sigmoid(shared_expert_gate(x)) (`GatedSharedExperts`).
- Qwen3-MoE (Qwen3MoeSparseMoeBlock): softmax, `norm_topk_prob` from the config.
- DeepSeek-V3 (DeepseekV3MoE): sigmoid_grouped with `e_score_correction_bias`, `n_group`,
  `topk_group`, `routed_scaling_factor`, `norm_topk_prob`; `n_shared_experts` fused shared MLP.
- OLMoE (OlmoeSparseMoeBlock): softmax, `norm_topk_prob` from the config (False in OLMoE-1B-7B).
- GPT-OSS (GptOssMLP, router at `.router`): softmax_after_topk on the logits including the
  router bias; swiglu_clamped experts (swiglu_limit, swiglu_alpha) with biases; the block
  returns (hidden, router_scores).

Weight layouts: the first five store `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
`down_proj` [E, H, I], which are our w13 / w2 as they are (views, no copy, on one rank).
GPT-OSS stores `gate_up_proj` [E, H, 2I] with gate and up interleaved along the last dim
(gate = [..., 0::2], up = [..., 1::2]) and `down_proj` [E, I, H]; both are de-interleaved and
transposed once, at patch time.

Routing (`picks=`): by default ("hf") the block runs the experts and weights the HF router
module picked, in routed mode, so a patched model sends every token to exactly the experts the
unpatched one does. That matters in bf16: router logits are bf16, where two experts often tie
exactly (8-bit mantissa), and `torch.topk` breaks ties its own way (on CPU often towards the
higher id; unspecified on CUDA) while `epmoe.route` picks the lowest id. With route() on the
logits, 1-3% of tokens went to another expert than HF's; through the residual stream that made
the bf16 model's logits error against the fp32 model up to 35x HF's own bf16 error (OLMoE) and
changed greedy tokens. With the HF picks the error stays within 2x HF's (tests/test_hf.py
states the criterion). picks="logits" routes the router's logits with `epmoe.route` instead
(fp32 softmax, ties to the lowest id): the path `MoELayer.capture_graphs` replays; routed-mode
calls run eagerly and read the ids on the host once per call (`check_routing`).

Numerics: the HF router's weights are taken as it returns them (fp32 for Mixtral and
DeepSeek-V3; rounded to the model dtype by Qwen2/3-MoE, OLMoE and GPT-OSS) and applied in fp32;
each expert computes in fp32 from the model-dtype weights, rounds its rows to the model dtype,
and the combine (+ shared experts) sums in fp32 and casts once. HF instead rounds after every
projection and accumulates the k experts in the model dtype, so a patched bf16 model is the
more precise of the two; fp32 models agree to fp32 rounding.

Limits: the patched blocks are for inference. Expert weights leave the module tree (they are
held by the `MoELayer`, not registered as parameters), so patch after placing the model on its
device (`model.to(...)` afterwards does not move them), no gradient reaches them, Mixtral's
training-time router jitter is not applied, and `state_dict()` no longer lists them.
"""

from __future__ import annotations

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
    """One supported model family.

    name:    the HF `model_type` (also the transformers module: models/<name>/modeling_<name>.py).
    title:   the model family as people write it.
    block:   class name of its MoE block.
    router:  attribute of the block holding the router module.
    returns_scores: the block returns (hidden, router_scores) instead of hidden.
    """

    name: str
    title: str
    block: str
    router: str = "gate"
    returns_scores: bool = False

    @property
    def module(self) -> str:
        return f"transformers.models.{self.name}.modeling_{self.name}"


FAMILIES: dict[str, _Family] = {
    f.name: f
    for f in (
        _Family("mixtral", "Mixtral", "MixtralSparseMoeBlock"),
        _Family("qwen2_moe", "Qwen2-MoE", "Qwen2MoeSparseMoeBlock"),
        _Family("qwen3_moe", "Qwen3-MoE", "Qwen3MoeSparseMoeBlock"),
        _Family("deepseek_v3", "DeepSeek-V3", "DeepseekV3MoE"),
        _Family("olmoe", "OLMoE", "OlmoeSparseMoeBlock"),
        _Family("gpt_oss", "GPT-OSS", "GptOssMLP", router="router", returns_scores=True),
    )
}


def _supported() -> str:
    return ", ".join(f"{f.title} ({f.block})" for f in FAMILIES.values())


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------


def config_from_hf(hf_config: Any) -> MoEConfig:
    """The `MoEConfig` of the MoE layers of a transformers config (`model.config`): `MoEConfig.from_hf`."""
    return MoEConfig.from_hf(hf_config)


def _block_config(cfg: MoEConfig, experts: Any) -> MoEConfig:
    """The config of one block: GPT-OSS experts clamp and scale with the module's own `limit` and
    `alpha`, which transformers 5.17 hard-codes (7.0, 1.702) and later versions read from the
    config: whichever the installed version computes with is what the patched block must use."""
    if cfg.activation == "swiglu_clamped" and hasattr(experts, "limit") and hasattr(experts, "alpha"):
        return cfg.replace(swiglu_limit=float(experts.limit), swiglu_alpha=float(experts.alpha))
    return cfg


# ---------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------


@dataclass
class GatedSharedExperts(SharedExperts):
    """Qwen2-MoE's shared expert, scaled per token by a sigmoid gate.

    w13: [2S, H] gate rows then up rows; w2: [H, S]; gate: [1, H] (`shared_expert_gate.weight`).
    out = sigmoid(x @ gate.T) * w2 @ act(w13 @ x), in fp32 (MoELayer adds it before its one cast).
    """

    gate: torch.Tensor

    def __call__(self, x: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
        scale = torch.sigmoid(x.float() @ self.gate.float().T)  # [T, 1]
        return scale * super().__call__(x, cfg)  # [T, H] fp32


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
    if family.name != "gpt_oss":
        # gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I]: ours as they are.
        return ExpertWeights(_rows(experts.gate_up_proj, ids, own), _rows(experts.down_proj, ids, own))
    # gate_up_proj [E, H, 2I] gate/up interleaved, down_proj [E, I, H]: de-interleaved and transposed
    return gpt_oss_experts(_rows(experts.gate_up_proj, ids, own=False),
                           _rows(experts.gate_up_proj_bias, ids, own=False),
                           _rows(experts.down_proj, ids, own=False), _rows(experts.down_proj_bias, ids, own))


def _mlp_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [2S, H], w2 [H, S] of an HF gate/up/down MLP."""
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        if proj.bias is not None:
            raise ValueError(f"shared expert {type(mlp).__name__} has biases; epmoe shared experts have none")
    w13 = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
    return w13, mlp.down_proj.weight.detach()


def _shared(family: _Family, block: nn.Module, cfg: MoEConfig) -> SharedExperts | None:
    if not cfg.shared_experts:
        return None
    if family.name == "qwen2_moe":
        w13, w2 = _mlp_weights(block.shared_expert)
        return GatedSharedExperts(w13, w2, gate=block.shared_expert_gate.weight.detach())
    w13, w2 = _mlp_weights(block.shared_experts)  # deepseek_v3
    return SharedExperts(w13, w2)


# ---------------------------------------------------------------------------------------
# the replacement block
# ---------------------------------------------------------------------------------------


class HFMoEBlock(nn.Module):
    """An HF MoE block running on `MoELayer`; same forward signature and return value.

    forward(hidden_states [B, S, H]) -> [B, S, H], or (that, router_scores [B*S, K]) for GPT-OSS.

        logits = router(x)[0]           # the HF router module, kept as is: [T, E]
        y      = moe(x, logits)         # route -> dispatch -> experts -> combine (+ shared)
    """

    def __init__(self, family: str, router: nn.Module, moe: MoELayer, picks: str = "hf") -> None:
        super().__init__()
        if picks not in PICKS:
            raise ValueError(f"picks={picks!r} is not supported; pass one of {PICKS}")
        self.family = FAMILIES[family]
        self.router_name = self.family.router
        setattr(self, self.router_name, router)  # same state_dict key as before: mlp.gate.weight
        self.moe = moe
        self.picks = picks

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        # The HF router module, called as the HF block calls it (router bias, fp32 for DeepSeek),
        # so `output_router_logits` still records its logits.
        router_logits, router_scores, router_ids = getattr(self, self.router_name)(x)  # [T, E], [T, K] x2
        if self.picks == "hf":
            # HF's own picks, ties included; checked by MoELayer only when built with validate=True.
            routing = Routing.external(router_ids, router_scores, self.moe.cfg.num_experts, validate=False)
            y = self.moe(x, routing=routing).reshape(shape)
        else:
            y = self.moe(x, router_logits.reshape(x.shape[0], -1)).reshape(shape)
        if self.family.returns_scores:
            return y, router_scores
        return y

    def extra_repr(self) -> str:
        m = self.moe
        return (
            f"family={self.family.name}, picks={self.picks}, comm={m.combo.comm}, runner={m.combo.runner}, "
            f"layout={m.layout}"
        )


def _model_type(hf_config: Any) -> str | None:
    """The `model_type` of a config (of its text config for composite ones)."""
    if hasattr(hf_config, "get_text_config"):
        hf_config = hf_config.get_text_config()
    return getattr(hf_config, "model_type", None)


def _family_of(module: nn.Module) -> _Family | None:
    cls = type(module)
    for f in FAMILIES.values():
        if cls.__name__ == f.block and cls.__module__ == f.module:
            return f
    return None


def patch_model(
    model: nn.Module,
    group: RankGroup | None = None,
    comm: str = "auto",
    runner: str = "auto",
    layout: str | None = None,
    quant: str | None = None,
    picks: str = "hf",
    graphs: int = 0,
    **layer_kwargs: Any,
) -> list[str]:
    """Replace every MoE block of a transformers model by an `HFMoEBlock`; return their names.

    model:  a Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, OLMoE or GPT-OSS model (transformers
            >= 5), already on its device and in its dtype (bf16 / fp16 / fp32).
    group:  the EP ranks (`EPGroup`, a `VirtualGroup` rank) or None for one rank. With W ranks
            each rank keeps only its E/W experts (contiguous blocks, or `placement=`); every
            rank must run the same number of forward calls.
    comm:   "auto" (default): "none" for one rank or the tp layout (nothing to move), else
            MoELayer's per-call pick by token count; or a backend name ("none", "allgather",
            "nccl_a2a", "symm_a2a").
    runner: "auto" (default; select.pick_runner: triton on CUDA, reference on the CPU),
            "reference" or "triton".
    layout: "tp" or "dp"; default "tp" with several ranks and comm "auto" or "none" (every
            rank runs the same tokens, as when the attention is tensor-parallel), else "dp"
            (each rank runs its own batch).
    quant:  None keeps the expert weights in the model's dtype; "fp8" (per expert), "fp8_block"
            (128x128 blocks) or "nvfp4" (16-value blocks, needs H and I divisible by 16)
            quantizes this rank's routed experts while patching (`epmoe.quant.quantize_weights`,
            dynamic scales from the weights). Biases and shared experts stay unquantized.
    picks:  "hf" (default): run the experts and weights the HF router picked (ties broken as
            HF does); "logits": `epmoe.route` on the router logits (ties to the lowest id; the
            path CUDA graphs replay). See the module docstring.
    graphs: > 0 (CUDA, one rank): each layer's calls of up to this many tokens replay CUDA graphs,
            each power-of-two bucket captured on its first call (`MoELayer.capture_graphs(graphs,
            lazy=True)`, all layers sharing one memory pool), so decode steps cost a replay per
            layer instead of a chain of launches; 0: eager calls.
    layer_kwargs: further `MoELayer` arguments (placement, capture, comm_options, validate).
            `validate` defaults to False here: the inputs come from the model's own router (HF's
            top-k gives distinct ids in range), so a call reads nothing on the host and never
            waits for the GPU; pass validate=True to have every call check them (one host read).
    """
    if quant is not None and quant not in QUANT_FORMATS:
        raise ValueError(
            f"quant={quant!r} is not supported; pass one of {(None, *QUANT_FORMATS)} (None keeps the "
            "expert weights in the model's dtype)"
        )
    if picks not in PICKS:
        raise ValueError(f"picks={picks!r} is not supported; pass one of {PICKS}")
    layer_kwargs.setdefault("validate", False)
    bad = sorted(set(layer_kwargs) & set(_DERIVED))
    if bad:
        raise ValueError(f"patch_model sets {bad} itself from the model; do not pass them in layer_kwargs")
    world = group.world if group is not None else 1
    rank = group.rank if group is not None else 0
    if layout is None:
        layout = "tp" if world > 1 and comm in ("auto", "none") else "dp"
    if comm == "auto" and (world == 1 or layout == "tp"):
        comm = "none"  # nothing moves; resolved here so the layer reports the backend it runs

    blocks = [(name, m, f) for name, m in model.named_modules() if (f := _family_of(m)) is not None]
    if not blocks:
        if any(isinstance(m, HFMoEBlock) for m in model.modules()):
            raise ValueError(f"{type(model).__name__} is already patched (its MoE blocks are HFMoEBlock)")
        raise ValueError(
            f"{type(model).__name__} has no MoE block epmoe recognises; supported families: "
            f"{_supported()} (transformers >= 5)"
        )
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError(f"{type(model).__name__} has no .config; pass the transformers model itself")
    cfg = config_from_hf(hf_config)
    placement = layer_kwargs.pop("placement", None) or Placement.contiguous(cfg.num_experts, world)
    ids = placement.global_ids(rank)  # [E_local] global ids of this rank's experts

    if graphs < 0 or graphs and (world > 1 or next(model.parameters()).device.type != "cuda"):
        raise ValueError(f"graphs={graphs}: graphs captured on first use need a model on a CUDA device and one "
                         "rank (graphs > 0), or pass graphs=0")
    pool = torch.cuda.graph_pool_handle() if graphs else None
    names = []
    for name, block, family in blocks:
        if not name:
            raise ValueError("patch the model that holds the MoE blocks, not a block itself")
        if family.name != _model_type(hf_config):
            raise ValueError(
                f"{name} is a {family.title} block but the model config has "
                f"model_type={_model_type(hf_config)!r}; patch a model of one family"
            )
        weights = _expert_weights(family, block.experts, ids, own=world > 1)
        if quant is not None:
            weights = ExpertWeights(
                quantize_weights(weights.w13, quant), quantize_weights(weights.w2, quant), weights.b13, weights.b2
            )
        router = getattr(block, family.router)
        bias = router.e_score_correction_bias.detach() if cfg.uses_correction_bias else None
        moe = MoELayer(
            _block_config(cfg, block.experts), weights, group=group, comm=comm, runner=runner, layout=layout,
            placement=placement,
            correction_bias=bias, shared=_shared(family, block, cfg), **layer_kwargs,
        )
        if graphs:
            moe.capture_graphs(graphs, routed=picks == "hf", validate=moe.validate, lazy=True, pool=pool)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, HFMoEBlock(family.name, router, moe, picks=picks))
        names.append(name)
    return names
