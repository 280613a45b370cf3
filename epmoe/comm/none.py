"""`none`: no token movement.

- world 1: all experts are local; dispatch is a view of x.
- `tp` layout (every rank holds the same tokens): each rank computes the pairs whose expert
  it owns (others are -1 padding), forms fp32 weighted partial sums, and the partial sums are
  all-reduced in fp32 before one cast. No host sync: CUDA-graph safe.

    dispatch:  expert_ids[t*K + k] = local id of ids[t, k] on this rank, else -1     one launch
               row_ids[t*K + k] = t;  expert_counts[e] = pairs of local expert e    (same launch)
    combine:   y[t] = cast(sum_k w[t, k] * out[t*K + k]  (+ addend[t]))              one launch
               tp:   all_reduce(fp32 sums), + addend, cast

On CUDA both stages are Triton kernels (epmoe/kernels/combine.py, launched by
epmoe/ops/combine.py); `local_dispatch_torch` and `weighted_sum_torch` are their plain-torch
twins, used on the CPU. Why: measured on an H200
(qwen3-30b-a3b) with the twins, the whole layer took 87.6 us at 1 token against 25 us for the
experts stage (1732 vs 799 us at 4096 tokens); dispatch and combine were ~30 small torch ops
(counted). The kernels' own times are not measured yet.

Runners read `expert_ids` and `row_ids`; `expert_counts` is part of the Dispatched contract
but no runner reads it today. Both come out of the dispatch kernel's single pass, so writing
them costs no extra launch (the Triton runner reads row_ids, so it stays materialized).

One rank with experts in id order, kernel path: dispatch launches nothing. expert_ids is the
routing ids' view, row_ids a view of a kept table of p // K, expert_counts None; an id past E (an
unchecked routed call) is skipped by every runner kernel and by combine (`num_ids`). Measured on
an H100 host, the dispatch launch alone cost 67 us of host time per call (docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epmoe.comm.base import CommBackend, CommOptions, Dispatched, finish
from epmoe.comm.registry import register_comm
from epmoe.config import MoEConfig
from epmoe.group import Pending, Placement, RankGroup
from epmoe.ops.combine import IMPLS, local_dispatch, pick_impl, weighted_sum
from epmoe.routing import Routing


@dataclass
class LocalHandle:
    """weights: [T, K] fp32 router weights; local: [T, K] int32 local expert of each pair, -1 =
    not computed on this rank (combine masks it); dtype: the output dtype (x's)."""

    weights: torch.Tensor
    local: torch.Tensor
    dtype: torch.dtype


@dataclass(frozen=True)
class NoneOptions(CommOptions):
    """impl: "auto" (Triton kernels on CUDA, plain torch elsewhere), "triton" (also on the CPU
    under TRITON_INTERPRET=1) or "torch"."""

    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.impl not in IMPLS:
            raise ValueError(f"comm 'none': impl must be one of {IMPLS}, got {self.impl!r}")


@register_comm
class NoComm(CommBackend):
    """Local compute (see the module docstring; options: `NoneOptions`)."""

    name = "none"
    layouts = ("dp", "tp")
    payloads = ("bf16",)
    devices = ("cpu", "cuda")
    needs_host_sync = False
    static_capable = False
    single_node = False
    moves_tokens = False
    split_phase = True  # trivially: dispatch is local; combine's tp all-reduce is posted async
    Options = NoneOptions

    def __init__(self, cfg: MoEConfig, group: RankGroup | None, placement: Placement,
                 options: NoneOptions | None = None, *, device: torch.device | str, dtype: torch.dtype) -> None:
        super().__init__(cfg, group, placement, options, device=device, dtype=dtype)
        self.impl = self.options.impl
        # One rank, experts in id order: a pair's local expert is its routing id and its row p // K,
        # so the kernel path's dispatch launches nothing (rows come from a kept table; ids past E,
        # possible only in unchecked routed calls, are skipped by the runners' kernels and by combine).
        E = cfg.num_experts
        self._direct = self.world == 1 and torch.equal(placement.expert_local.cpu(), torch.arange(E))
        self._rows: dict[tuple[int, torch.device], list[torch.Tensor]] = {}  # (K, device) -> tables, last largest

    def _row_ids(self, M: int, K: int, device: torch.device) -> torch.Tensor:
        """[M] int32 rows p // K: a view of a table grown by doubling. Outgrown tables stay alive,
        since a CUDA graph may have captured their address."""
        tables = self._rows.setdefault((K, device), [])
        if not tables or tables[-1].numel() < M:
            n = max(1024, 2 * M, 2 * tables[-1].numel() if tables else 0)
            tables.append(torch.arange(n, dtype=torch.int32, device=device) // K)
        return tables[-1][:M]

    def dispatch_start(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None
                       ) -> Pending[Dispatched]:
        T, K = routing.ids.shape
        if self._direct and pick_impl(self.impl, x.device) == "triton":
            ids = routing.ids.contiguous()
            return Pending.done(Dispatched(x, self._row_ids(T * K, K, x.device), ids.view(-1), None,
                                           handle=LocalHandle(routing.weights, ids, x.dtype)))
        pairs = local_dispatch(routing.ids, self.placement_on(x.device), self.rank, self.impl, check=False)
        return Pending.done(Dispatched(
            hidden=x,
            row_ids=pairs.row_ids,
            expert_ids=pairs.expert_ids,
            expert_counts=pairs.counts,
            handle=LocalHandle(routing.weights, pairs.expert_ids.view(T, K), x.dtype),
        ))

    def combine_start(
        self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
        addend: torch.Tensor | None = None,
    ) -> Pending[torch.Tensor]:
        h: LocalHandle = dispatched.handle
        T, K = h.weights.shape
        if self.world == 1:  # one launch: k-sum, + addend, cast into out
            # built here from this backend's own handle: checked only where the caller passes out or
            # an addend, or the runner's rows are not one per pair
            trusted = out is None and addend is None and expert_out.dim() == 2 and expert_out.shape[0] == T * K
            if out is None:
                out = torch.empty(T, expert_out.shape[-1], dtype=h.dtype, device=expert_out.device)
            # launched by the wait, which alone reads the addend (the layer's side stream joins in between)
            return Pending(lambda: weighted_sum(expert_out, h.weights, h.local, T, K, addend=addend, y=out,
                                                impl=self.impl, check=not trusted, num_ids=self.cfg.num_experts))
        acc = weighted_sum(expert_out, h.weights, h.local, T, K, impl=self.impl)  # [T, H] fp32 partial
        summed = self.group.start_all_reduce(acc)
        return Pending(lambda: finish(summed.wait(), h.dtype, out, addend, f"comm {self.name!r}"))
