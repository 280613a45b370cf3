"""`none`: no token movement.

- world 1: all experts are local; dispatch is a view of x.
- `tp` layout (every rank holds the same tokens): each rank computes the pairs whose expert
  it owns (others are -1 padding), forms fp32 weighted partial sums, and the partial sums are
  all-reduced in fp32 before one cast. No host sync: CUDA-graph safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.comm.base import CommBackend, Dispatched, count_experts, local_pairs, weighted_sum
from epmoe.comm.registry import register_comm
from epmoe.routing import Routing


@dataclass
class LocalHandle:
    """weights: [T, K] fp32 router weights; valid: [T, K] bool, pair computed on this rank;
    dtype: the output dtype (x's)."""

    weights: torch.Tensor
    valid: torch.Tensor
    dtype: torch.dtype


@register_comm
class NoComm(CommBackend):
    name = "none"
    layouts = ("dp", "tp")
    needs_host_sync = False

    def dispatch(self, x: torch.Tensor, routing: Routing) -> Dispatched:
        T, K = routing.ids.shape
        expert_ids = local_pairs(routing.ids, self.placement_on(x.device), self.rank)  # [T, K]
        row_ids = torch.arange(T, dtype=torch.int32, device=x.device).repeat_interleave(K)
        flat = expert_ids.reshape(-1)
        return Dispatched(
            hidden=x,
            row_ids=row_ids,
            expert_ids=flat,
            expert_counts=count_experts(flat, self.placement.local_experts),
            handle=LocalHandle(routing.weights, expert_ids >= 0, x.dtype),
        )

    def combine(
        self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        h: LocalHandle = dispatched.handle
        T, K = h.weights.shape
        acc = weighted_sum(expert_out, h.weights, h.valid, T, K)  # [T, H] fp32
        if self.world > 1:
            self.group.all_reduce(acc)
        if out is None:
            return acc.to(h.dtype)
        return out.copy_(acc)
