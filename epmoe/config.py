"""MoE layer configuration and model presets.

`MoEConfig` describes one MoE layer: its shapes, its activation and how tokens are routed.
Presets (`MoEConfig.from_preset("deepseek-v3")`) come from the packaged ``presets.json``, whose
values are taken from each model's published ``config.json``; `MoEConfig.from_hf` reads such a
``config.json`` (a checkpoint folder, the file, its dict, or a transformers config object).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

ACTIVATIONS = ("silu", "gelu", "swiglu_clamped")
ROUTINGS = ("softmax", "softmax_after_topk", "sigmoid_bias", "sigmoid_grouped")
# Hugging Face `model_type`s whose MoE layers `MoEConfig.from_hf` maps (integrations/hf.py patches them).
HF_MODEL_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss", "minimax_m2", "glm4_moe", "dots1",
    "deepseek_v2", "granitemoe", "granitemoeshared", "qwen3_next", "hunyuan_v1_moe", "flex_olmo", "glm4_moe_lite",
    "minicpm5_moe", "solar_open", "mimo_v2_flash", "exaone_moe", "hy_v3", "afmoe", "lfm2_moe", "mellum", "minimax",
    "jamba", "granitemoe_swa", "granitemoehybrid", "lara_mini", "flint", "laguna",
)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# (fields, check, what the fields must be): the type and range checks of MoEConfig, in order
_FIELD_CHECKS: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("hidden", "intermediate", "num_experts", "top_k"), lambda v: _is_int(v) and v > 0, "a positive int"),
    (("norm_topk_prob",), lambda v: isinstance(v, bool), "a bool"),
    (("n_group", "topk_group", "shared_experts"), _is_int, "an int"),
    (("shared_intermediate",), lambda v: v is None or _is_int(v), "an int or None"),
    (("routed_scaling_factor", "swiglu_limit", "swiglu_alpha"),
     lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf, "a finite number > 0"),
)


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing of one MoE layer.

    activation: "silu" (SiLU(gate) * up), "gelu" (GELU(gate) * up) or "swiglu_clamped" (GPT-OSS: gate
                clamped above at swiglu_limit, up to +-swiglu_limit, (up + 1) * gate * sigmoid(swiglu_alpha *
                gate); experts carry biases).
    routing:    "softmax"            softmax over E, top-k (renormalised if norm_topk_prob);
                "softmax_after_topk" top-k on logits, softmax over the k chosen (GPT-OSS);
                "sigmoid_bias"       pick by sigmoid + correction bias, weight by sigmoid (MiniMax);
                "sigmoid_grouped"    DeepSeek-V3 grouped top-k with correction bias.
    """

    hidden: int  # model width H (rows of `x` are [H])
    intermediate: int  # expert intermediate size I (w13 is [E, 2I, H], w2 is [E, H, I])
    num_experts: int  # routed experts E
    top_k: int  # experts per token K (K <= E)
    activation: str = "silu"
    routing: str = "softmax"
    norm_topk_prob: bool = True  # renormalise the K chosen weights to sum to 1
    n_group: int = 1  # grouped top-k: keep the best `topk_group` of `n_group` expert groups
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the final routing weights (DeepSeek-V3: 2.5)
    shared_experts: int = 0  # always-on shared experts, fused into one MLP (width shared_experts * shared_intermediate)
    shared_intermediate: int | None = None  # intermediate size of one shared expert (default: `intermediate`)
    swiglu_limit: float = 7.0  # swiglu_clamped only
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        for names, ok, what in _FIELD_CHECKS:
            for name in names:
                value = getattr(self, name)
                if not ok(value):
                    raise ValueError(f"MoEConfig.{name} must be {what}, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                             "a token cannot pick more distinct experts than exist")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"unknown routing {self.routing!r}; choose one of {ROUTINGS}")
        if self.n_group <= 0 or self.topk_group <= 0 or self.topk_group > self.n_group:
            raise ValueError(f"need 0 < topk_group <= n_group, got topk_group={self.topk_group}, "
                             f"n_group={self.n_group}")
        if self.routing == "sigmoid_grouped":
            if self.num_experts % self.n_group:
                raise ValueError(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                raise ValueError("sigmoid_grouped needs at least 2 experts per group")
            if self.top_k > self.topk_group * per_group:
                raise ValueError(f"top_k={self.top_k} exceeds the {self.topk_group * per_group} experts in the "
                                 f"{self.topk_group} kept groups")
        if self.shared_experts < 0:
            raise ValueError("shared_experts must be >= 0")
        if self.shared_intermediate is not None and self.shared_intermediate <= 0:
            raise ValueError("shared_intermediate must be positive")

    @property
    def has_bias(self) -> bool:
        """Whether experts carry biases (GPT-OSS's clamped SwiGLU does)."""
        return self.activation == "swiglu_clamped"

    @property
    def uses_correction_bias(self) -> bool:
        """Whether routing adds an `e_score_correction_bias` [E] before picking experts."""
        return self.routing in ("sigmoid_bias", "sigmoid_grouped")

    @property
    def shared_width(self) -> int:
        """Intermediate width of the fused shared-expert MLP (0 when there is none)."""
        return self.shared_experts * (self.shared_intermediate or self.intermediate)

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def scaled(self, hidden: int, intermediate: int, num_experts: int | None = None) -> MoEConfig:
        """The same routing and activation at smaller shapes, for demos and tests."""
        experts = num_experts or self.num_experts
        shared = {} if self.shared_intermediate is None else {"shared_intermediate": intermediate}
        return self.replace(hidden=hidden, intermediate=intermediate, num_experts=experts,
                            top_k=min(self.top_k, experts), **shared)

    @classmethod
    def from_preset(cls, name: str) -> MoEConfig:
        """The config of a named model; `preset_names()` lists them."""
        table = _presets()
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
        entry = {"num_experts" if k == "experts" else k: v for k, v in table[name].items()}
        for key in ("swiglu_limit", "swiglu_alpha", "routed_scaling_factor"):
            if key in entry:
                entry[key] = float(entry[key])
        return cls(**entry)

    @classmethod
    def from_hf(cls, hf_config: Any) -> MoEConfig:
        """The MoE layers' config of a Hugging Face model (`HF_MODEL_TYPES`), e.g. from_hf("/models/Qwen3-30B-A3B").
        hf_config: a transformers config object, the dict of a ``config.json``, its path or its folder."""
        return _config_from_hf(_hf_text_config(hf_config))


def _hf_text_config(hf_config: Any) -> Any:
    """An object with the text model's config fields as attributes, from any input of `from_hf`."""
    if isinstance(hf_config, (str, Path)):
        path = Path(hf_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"no Hugging Face config at {path}: pass a checkpoint folder holding config.json, "
                             "the file itself, its dict or a transformers config")
        hf_config = json.loads(path.read_text())
    if isinstance(hf_config, dict):
        d = dict(hf_config.get("text_config") or hf_config)
        if "model_type" not in d:
            raise ValueError("the Hugging Face config has no 'model_type'; is it a model's config.json?")
        if d["model_type"] not in HF_MODEL_TYPES:
            return _Fields(d)  # refused by name below
        try:  # transformers fills in the fields a config.json leaves at their defaults
            from transformers import AutoConfig
        except ImportError:  # without transformers the config.json must hold every field read
            return _Fields(d)
        return AutoConfig.for_model(**d)
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


class _MissingField(AttributeError, ValueError):
    """A field a config.json lacks: getattr(c, name, default) still falls back to its default."""


class _Fields:
    """A config.json dict read as attributes; a missing field is a ValueError naming it."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)

    def __getattr__(self, name: str) -> Any:
        raise _MissingField(f"the Hugging Face config ({self.__dict__.get('model_type')}) has no field {name!r}")


def _hf_activation(c: Any) -> str:
    act = getattr(c, "hidden_act", "silu")
    if act in ("silu", "swish", "gelu"):  # transformers' "gelu" is the exact erf form, as ours
        return "gelu" if act == "gelu" else "silu"
    raise ValueError(f"{type(c).__name__}.hidden_act={act!r} is not supported; epmoe experts compute "
                     "'silu' or 'gelu' (exact) activations")


@dataclass(frozen=True)
class _HFMapping:
    """Where one family's config keeps its MoE fields (the shapes read by `_config_from_hf`)."""

    routing: str
    intermediate: str = "moe_intermediate_size"  # width of one routed expert
    experts: str = "num_experts"  # routed experts (most configs alias num_experts / num_local_experts)
    norm: bool | None = None  # the router always (True) or never (False) renormalises; None: norm_topk_prob
    shared: str = ""  # "": none; a config field: that many shared experts of the routed width, fused;
    #                   "sized": one of shared_expert_intermediate_size; "one": one of the routed width
    scale: str = ""  # config field multiplying the routing weights ("": none)


_DEEPSEEK = _HFMapping("sigmoid_grouped", experts="n_routed_experts", shared="n_shared_experts",
                       scale="routed_scaling_factor")
# model_type -> mapping; integrations/hf.py holds the blocks, docs/hf.md what each router computes
_HF_MAPPINGS: dict[str, _HFMapping] = {
    "mixtral": _HFMapping("softmax", "intermediate_size", "num_local_experts", norm=True),
    "qwen2_moe": _HFMapping("softmax", shared="sized"),
    "qwen3_moe": _HFMapping("softmax"),
    "qwen3_next": _HFMapping("softmax", shared="sized"),
    "olmoe": _HFMapping("softmax", "intermediate_size"),
    "flex_olmo": _HFMapping("softmax", "intermediate_size"),
    "mellum": _HFMapping("softmax"),
    "lara_mini": _HFMapping("softmax", shared="sized"),
    "minimax": _HFMapping("softmax", "intermediate_size", "num_local_experts", norm=True),
    "jamba": _HFMapping("softmax", "intermediate_size", norm=False),
    "hunyuan_v1_moe": _HFMapping("softmax", "intermediate_size", norm=True, shared="one"),
    "deepseek_v2": _HFMapping("softmax", experts="n_routed_experts", norm=False, shared="n_shared_experts",
                              scale="routed_scaling_factor"),
    "deepseek_v3": _DEEPSEEK,
    "glm4_moe": _DEEPSEEK,
    "glm4_moe_lite": _DEEPSEEK,
    "dots1": _DEEPSEEK,
    "minicpm5_moe": _DEEPSEEK,
    "solar_open": _DEEPSEEK,
    "mimo_v2_flash": _HFMapping("sigmoid_grouped", experts="n_routed_experts", scale="routed_scaling_factor"),
    "exaone_moe": _HFMapping("sigmoid_grouped", shared="num_shared_experts", scale="routed_scaling_factor"),
    "minimax_m2": _HFMapping("sigmoid_bias", "intermediate_size", "num_local_experts", norm=True),
    "hy_v3": _HFMapping("sigmoid_bias", norm=True, shared="num_shared_experts", scale="router_scaling_factor"),
    "afmoe": _HFMapping("sigmoid_bias", norm=True, shared="num_shared_experts", scale="route_scale"),
    "lfm2_moe": _HFMapping("sigmoid_bias", scale="routed_scaling_factor"),
    "flint": _HFMapping("sigmoid_bias", shared="sized"),
    "laguna": _HFMapping("sigmoid_bias", norm=True, shared="sized", scale="moe_routed_scaling_factor"),
    "granitemoe": _HFMapping("softmax_after_topk", "intermediate_size", "num_local_experts", norm=True),
    "granitemoeshared": _HFMapping("softmax_after_topk", "intermediate_size", "num_local_experts", norm=True),
    "granitemoe_swa": _HFMapping("softmax_after_topk", "intermediate_size", "num_local_experts", norm=True),
    "granitemoehybrid": _HFMapping("softmax_after_topk", "intermediate_size", "num_local_experts", norm=True),
}


def _config_from_hf(c: Any) -> MoEConfig:
    """The field mapping of each supported model family (see integrations/hf.py for its blocks)."""
    model_type = getattr(c, "model_type", None)
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{type(c).__name__} (model_type={model_type!r}) is not a supported MoE family; "
                         f"supported model_types: {', '.join(HF_MODEL_TYPES)}")
    common: dict[str, Any] = {"hidden": c.hidden_size, "top_k": c.num_experts_per_tok}
    if model_type == "gpt_oss":  # top-k on the biased logits, softmax over the k; hidden_act unused by the experts
        # transformers 5.17's GptOssConfig has no swiglu_limit / swiglu_alpha: its experts hard-code these
        return MoEConfig(**common, intermediate=c.intermediate_size, num_experts=c.num_local_experts,
                         activation="swiglu_clamped", routing="softmax_after_topk",
                         swiglu_limit=float(getattr(c, "swiglu_limit", 7.0)),
                         swiglu_alpha=float(getattr(c, "swiglu_alpha", 1.702)))
    m = _HF_MAPPINGS[model_type]
    if model_type == "laguna" and (getattr(c, "moe_router_logit_softcapping", 0.0) or 0.0) > 0:
        raise ValueError(f"Laguna moe_router_logit_softcapping={c.moe_router_logit_softcapping} (tanh on the router "
                         "logits) is not an epmoe routing mode; only configs without it map")
    if model_type == "deepseek_v2" and getattr(c, "topk_method", "greedy") != "greedy":
        raise ValueError(f"DeepSeek-V2 topk_method={c.topk_method!r} (softmax, groups ranked by their best expert) "
                         "is not an epmoe routing mode; only topk_method='greedy' (DeepSeek-V2-Lite) maps")
    common["num_experts"] = getattr(c, m.experts)
    for key, value in common.items():  # Hunyuan's moe_topk / num_experts may be per layer
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"{type(c).__name__}: {key} differs per layer ({list(value)}); epmoe maps one "
                                 "MoEConfig to every MoE layer")
            common[key] = value[0]
    intermediate = getattr(c, m.intermediate)
    shared, width = 0, None
    if m.shared == "sized":
        width = getattr(c, "shared_expert_intermediate_size", 0) or None
        shared = 1 if width else 0
    elif m.shared == "one":
        shared = 1
    elif m.shared:  # that many shared experts of the routed width, fused into one MLP
        shared = getattr(c, m.shared, 0) or 0
    grouped = {"n_group": c.n_group or 1, "topk_group": c.topk_group or 1} if m.routing == "sigmoid_grouped" else {}
    return MoEConfig(**common, intermediate=intermediate, activation=_hf_activation(c), routing=m.routing,
                     norm_topk_prob=bool(c.norm_topk_prob) if m.norm is None else m.norm,
                     routed_scaling_factor=float(getattr(c, m.scale) or 1.0) if m.scale else 1.0,
                     shared_experts=shared, shared_intermediate=width, **grouped)


@lru_cache(maxsize=1)
def _presets() -> dict[str, dict[str, Any]]:
    text = resources.files("epmoe").joinpath("presets.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def preset_names() -> list[str]:
    """Names accepted by `MoEConfig.from_preset`."""
    return sorted(_presets())
