"""The contract between comm backends and expert runners, and the backend base class.

    x [T, H], Routing ──dispatch──▶ Dispatched ──runner──▶ out [M, H] ──combine──▶ y [T, H]

A backend moves token rows to the ranks owning their experts (dispatch) and brings the expert
outputs back, weighted by the router and reduced in a fixed order (combine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from epmoe.config import MoEConfig
from epmoe.group import Placement, RankGroup
from epmoe.routing import Routing


@dataclass
class Dispatched:
    """The rows that landed on this rank, and the (row, local expert) pairs to compute.

    hidden:        [N, H] received token rows (a Tensor, or a quantized payload with its
                   scales); a token is sent once per destination rank, not once per expert.
    row_ids:       [M] int32, the row of `hidden` each pair reads.
    expert_ids:    [M] int32, local expert of each pair in [0, E_local); -1 = padding pair,
                   which runners skip and combine ignores (its output row is undefined).
    expert_counts: [E_local] int32 on the device, pairs per local expert (padding excluded).
    handle:        backend-private state that combine needs (weights, destinations, splits).

    A runner returns out [M, H] in hidden's dtype (bf16/fp16/fp32), one row per pair, in pair
    order, without router weights.
    """

    hidden: Any
    row_ids: torch.Tensor
    expert_ids: torch.Tensor
    expert_counts: torch.Tensor
    handle: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("row_ids", "expert_ids", "expert_counts"):
            t = getattr(self, name)
            if t.dtype != torch.int32:
                raise ValueError(f"Dispatched.{name} must be int32, got {t.dtype}")
        if self.row_ids.shape != self.expert_ids.shape or self.row_ids.dim() != 1:
            raise ValueError(
                f"Dispatched.row_ids and expert_ids must both be [M], got "
                f"{tuple(self.row_ids.shape)} and {tuple(self.expert_ids.shape)}"
            )

    @property
    def num_pairs(self) -> int:
        return self.expert_ids.shape[0]


def local_pairs(ids: torch.Tensor, placement: Placement, rank: int) -> torch.Tensor:
    """Map global expert ids (any shape) to this rank's local ids; -1 where another rank owns
    the expert. `placement` should already live on ids' device (see CommBackend.placement_on)."""
    ids = ids.long()
    owner = placement.expert_rank.to(ids.device)[ids]
    local = placement.expert_local.to(ids.device)[ids]
    return torch.where(owner == rank, local, torch.full_like(local, -1)).to(torch.int32)


def count_experts(expert_ids: torch.Tensor, num_local: int) -> torch.Tensor:
    """[num_local] int32 pairs per local expert, ignoring -1 padding (no host sync)."""
    valid = expert_ids >= 0
    counts = torch.zeros(num_local, dtype=torch.int32, device=expert_ids.device)
    counts.index_add_(0, expert_ids.long().clamp_min(0), valid.to(torch.int32))
    return counts


def weighted_sum(
    out: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """Per-token fp32 sum over k of weights * out, in k order, skipping invalid pairs.

    out [T*K, H] (pair t*K + k), weights [T, K] fp32, valid [T, K] bool -> [T, H] fp32.
    Invalid rows are masked with `where`, not multiplied by zero, so garbage (NaN, inf) in
    padding rows never leaks into the sum.
    """
    contrib = out.float().view(num_tokens, top_k, out.shape[-1]) * weights.unsqueeze(-1)
    contrib = torch.where(valid.unsqueeze(-1), contrib, torch.zeros((), device=out.device))
    acc = contrib[:, 0].clone()
    for k in range(1, top_k):
        acc += contrib[:, k]
    return acc


class CommBackend:
    """A dispatch/combine implementation, built once per layer.

    Class attributes describe what it supports (select.py reads them):
    name:            registry key.
    layouts:         attention layouts it serves ("dp": each rank its own tokens; "tp": every
                     rank the same tokens).
    needs_host_sync: whether a call reads device values on the host (count exchange), so it
                     cannot sit inside a CUDA graph.
    """

    name: ClassVar[str] = ""
    layouts: ClassVar[tuple[str, ...]] = ()
    needs_host_sync: ClassVar[bool] = False

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement, **options: Any) -> None:
        if options:
            raise ValueError(
                f"comm backend {self.name!r} takes no options, got {sorted(options)}"
            )
        self.cfg = cfg
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.world = group.world if group is not None else 1
        self.placement = placement
        self._placements: dict[torch.device, Placement] = {}

    def placement_on(self, device: torch.device) -> Placement:
        """The placement map on `device`, copied once (the first call runs before any graph
        capture, so no host-to-device copy happens inside one)."""
        p = self._placements.get(device)
        if p is None:
            p = self._placements[device] = self.placement.to(device)
        return p

    def dispatch(self, x: torch.Tensor, routing: Routing) -> Dispatched:
        raise NotImplementedError

    def combine(
        self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Weighted, reduced outputs [T, H] for this rank's tokens, in x's dtype (written into
        `out` when given)."""
        raise NotImplementedError
