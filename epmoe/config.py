"""MoE layer configuration and model presets.

`MoEConfig` describes one MoE layer: its shapes, its activation and how tokens are routed.
Presets (`MoEConfig.from_preset("deepseek-v3")`) come from the packaged ``presets.json``, whose
values are taken from each model's published ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

ACTIVATIONS = ("silu", "gelu", "swiglu_clamped")
ROUTINGS = ("softmax", "softmax_after_topk", "sigmoid_bias", "sigmoid_grouped")


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and routing of one MoE layer.

    hidden:        model width H (rows of `x` are [H]).
    intermediate:  expert intermediate size I (w13 is [E, 2I, H], w2 is [E, H, I]).
    num_experts:   routed experts E.
    top_k:         experts per token K (K <= E).
    activation:    "silu" (SiLU(gate) * up), "gelu" (GELU(gate) * up) or "swiglu_clamped"
                   (GPT-OSS: gate clamped above at swiglu_limit, up clamped to +-swiglu_limit,
                   (up + 1) * gate * sigmoid(swiglu_alpha * gate); experts carry biases).
    routing:       "softmax"            softmax over E, top-k (renormalised if norm_topk_prob);
                   "softmax_after_topk" top-k on logits, softmax over the k chosen (GPT-OSS);
                   "sigmoid_bias"       pick by sigmoid + correction bias, weight by sigmoid (MiniMax);
                   "sigmoid_grouped"    DeepSeek-V3 grouped top-k with correction bias.
    norm_topk_prob:        renormalise the K chosen weights to sum to 1.
    n_group, topk_group:   grouped top-k: keep the best `topk_group` of `n_group` expert groups.
    routed_scaling_factor: multiplies the final routing weights (DeepSeek-V3: 2.5).
    shared_experts:        number of always-on shared experts (fused into one MLP of width
                           shared_experts * shared_intermediate).
    shared_intermediate:   intermediate size of one shared expert (defaults to `intermediate`).
    """

    hidden: int
    intermediate: int
    num_experts: int
    top_k: int
    activation: str = "silu"
    routing: str = "softmax"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_experts: int = 0
    shared_intermediate: int | None = None
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                "a token cannot pick more distinct experts than exist"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {ACTIVATIONS}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"unknown routing {self.routing!r}; choose one of {ROUTINGS}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ValueError(f"MoEConfig.norm_topk_prob must be a bool, got {self.norm_topk_prob!r}")
        for name in ("n_group", "topk_group", "shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"MoEConfig.{name} must be an int, got {value!r}")
        if self.shared_intermediate is not None and (
            not isinstance(self.shared_intermediate, int) or isinstance(self.shared_intermediate, bool)
        ):
            raise ValueError(f"MoEConfig.shared_intermediate must be an int or None, got {self.shared_intermediate!r}")
        for name in ("routed_scaling_factor", "swiglu_limit", "swiglu_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
                raise ValueError(f"MoEConfig.{name} must be a finite number > 0, got {value!r}")
        if self.n_group <= 0 or self.topk_group <= 0 or self.topk_group > self.n_group:
            raise ValueError(
                f"need 0 < topk_group <= n_group, got topk_group={self.topk_group}, "
                f"n_group={self.n_group}"
            )
        if self.routing == "sigmoid_grouped":
            if self.num_experts % self.n_group:
                raise ValueError(
                    f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}"
                )
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                raise ValueError("sigmoid_grouped needs at least 2 experts per group")
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"top_k={self.top_k} exceeds the {self.topk_group * per_group} experts in the "
                    f"{self.topk_group} kept groups"
                )
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
        changes: dict[str, Any] = {
            "hidden": hidden,
            "intermediate": intermediate,
            "num_experts": experts,
            "top_k": min(self.top_k, experts),
        }
        if self.shared_intermediate is not None:
            changes["shared_intermediate"] = intermediate
        return self.replace(**changes)

    @classmethod
    def from_preset(cls, name: str) -> MoEConfig:
        """The config of a named model; `preset_names()` lists them."""
        table = _presets()
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
        entry = dict(table[name])
        fields = {
            "hidden": entry.pop("hidden"),
            "intermediate": entry.pop("intermediate"),
            "num_experts": entry.pop("experts"),
            "top_k": entry.pop("top_k"),
        }
        for key in ("swiglu_limit", "swiglu_alpha", "routed_scaling_factor"):
            if key in entry:
                entry[key] = float(entry[key])
        return cls(**fields, **entry)


@lru_cache(maxsize=1)
def _presets() -> dict[str, dict[str, Any]]:
    text = resources.files("epmoe").joinpath("presets.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def preset_names() -> list[str]:
    """Names accepted by `MoEConfig.from_preset`."""
    return sorted(_presets())
