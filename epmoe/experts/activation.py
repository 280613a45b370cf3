"""Expert activations on the gate/up halves of the w13 projection (plain torch, any dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from epmoe.config import MoEConfig


def activate(gate_up: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """[N, 2I] -> [N, I]. gate_up holds gate columns [0, I) then up columns [I, 2I).

    silu:           SiLU(gate) * up
    gelu:           GELU(gate, exact erf form) * up
    swiglu_clamped: GPT-OSS: g = min(gate, limit); u = clamp(up, -limit, limit);
                    (u + 1) * g * sigmoid(alpha * g)
    """
    gate, up = gate_up.chunk(2, dim=-1)
    if cfg.activation == "silu":
        return F.silu(gate) * up
    if cfg.activation == "gelu":
        return F.gelu(gate) * up
    limit = cfg.swiglu_limit
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(cfg.swiglu_alpha * gate)
