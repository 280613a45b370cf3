"""Expert activations on the gate/up halves of the w13 projection (plain torch, any dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epmoe.config import MoEConfig


def activate(gate_up: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """[N, 2I] (gate columns [0, I), then up) -> [N, I]: silu: SiLU(gate) * up; gelu: GELU(gate, exact
    erf form) * up; swiglu_clamped (GPT-OSS): g = min(gate, limit), u = clamp(up, +-limit),
    (u + 1) * g * sigmoid(alpha * g)."""
    gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
    if cfg.activation != "swiglu_clamped":
        return (F.silu(gate) if cfg.activation == "silu" else F.gelu(gate)) * up
    gate, up = gate.clamp(max=cfg.swiglu_limit), up.clamp(min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
    return (up + 1) * gate * torch.sigmoid(cfg.swiglu_alpha * gate)
