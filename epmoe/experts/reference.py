"""Reference expert runner: plain torch, fp32, one loop over local experts (the oracle of every runner).

    for each local expert e:
        rows = pairs p with expert_ids[p] == e
        h    = hidden[row_ids[rows]]                      # [n, H]
        a    = act(h @ w13[e].T + b13[e])                 # [n, I]
        out[rows] = a @ w2[e].T + b2[e]                   # [n, H]

Quantized weights or payloads are dequantized to fp32 first, so it is the reference for every format.
`act_quant="fp8_block"` is the twin of a w8a8 runner: the hidden rows (unless they arrived quantized) and
the activation between the GEMMs round-trip through e4m3 with one scale per row and 128 values
(`quantize_fp8_groups_torch`), as the fp8 tensor-core GEMMs see them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.comm.base import Dispatched
from epmoe.config import MoEConfig
from epmoe.experts.activation import activate
from epmoe.experts.base import ExpertRunner, ExpertWeights, as_float, register_runner
from epmoe.quant import quantize_fp8_groups_torch


def reference_experts(hidden: torch.Tensor, row_ids: torch.Tensor, expert_ids: torch.Tensor, weights: ExpertWeights,
                      cfg: MoEConfig, out_dtype: torch.dtype | None = None, act_quant: str | None = None
                      ) -> torch.Tensor:
    """hidden [N, H] (or quantized), row_ids/expert_ids [M] -> out [M, H] in out_dtype (default: hidden's
    dtype, fp32 for quantized payloads). Padding pairs get zero rows. act_quant: None or "fp8_block"."""
    if act_quant not in (None, "fp8_block"):
        raise ValueError(f"act_quant must be None or 'fp8_block', got {act_quant!r}")

    def fake_quant(t: torch.Tensor) -> torch.Tensor:  # e4m3 round trip, one scale per row and 128 values
        return t if act_quant is None or t.shape[0] == 0 else quantize_fp8_groups_torch(t).dequantize(torch.float32)

    fp8_rows = act_quant and not isinstance(hidden, torch.Tensor) and hidden.format in ("fp8", "fp8_block")
    x = as_float(hidden) if fp8_rows else fake_quant(as_float(hidden))  # [N, H] fp32
    out_dtype = out_dtype or (hidden.dtype if isinstance(hidden, torch.Tensor) else torch.float32)
    out = torch.zeros(expert_ids.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [M, H]
    ids = expert_ids.long()  # [M], -1 = padding
    for e in ids[ids >= 0].unique().tolist():
        rows = (ids == e).nonzero().flatten()  # [n]
        h = x[row_ids[rows].long()]  # [n, H]
        gate_up = h @ as_float(weights.w13[e]).T  # [n, 2I]
        if weights.b13 is not None:
            gate_up = gate_up + weights.b13[e].float()
        y = fake_quant(activate(gate_up, cfg)) @ as_float(weights.w2[e]).T  # [n, H]
        out[rows] = y if weights.b2 is None else y + weights.b2[e].float()
    return out.to(out_dtype)


@dataclass(frozen=True)
class ReferenceOptions:
    """The reference runner has no options."""


@register_runner
class ReferenceRunner(ExpertRunner):
    """`reference_experts` as a runner (every format, CPU and CUDA)."""

    name = "reference"
    formats = ("bf16", "fp8", "fp8_block", "nvfp4")
    devices = ("cpu", "cuda")
    needs_host_sync = True  # loops over the experts present (unique / nonzero)
    priority = 0
    Options = ReferenceOptions

    @classmethod
    def prepare(cls, weights: ExpertWeights, cfg: MoEConfig) -> ExpertWeights:
        """The reference runner reads our layout as is (it dequantizes per expert)."""
        return weights

    def __call__(self, d: Dispatched, out: torch.Tensor | None = None) -> torch.Tensor:
        y = reference_experts(d.hidden, d.row_ids, d.expert_ids, self.weights, self.cfg)
        return y if out is None else out.copy_(y)


def naive_moe(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights,
              cfg: MoEConfig) -> torch.Tensor:
    """The whole routed MoE, one token and one expert at a time, in fp32 (the test oracle).

    x [T, H], ids [T, K] global expert ids, weights [T, K], experts: all E experts.
    Returns [T, H] fp32: sum_k weights[t, k] * expert_{ids[t, k]}(x[t]).
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T, H]
    for t in range(x.shape[0]):
        for k, e in enumerate(ids[t].tolist()):
            gate_up = as_float(experts.w13[e]) @ x[t].float()  # [2I]
            if experts.b13 is not None:
                gate_up = gate_up + experts.b13[e].float()
            y = as_float(experts.w2[e]) @ activate(gate_up[None], cfg)[0]  # [H]
            if experts.b2 is not None:
                y = y + experts.b2[e].float()
            out[t] += weights[t, k].float() * y
    return out
