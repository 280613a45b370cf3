"""Expert load balancing: count the tokens each expert gets, and plan replicas of the hot ones.

`ExpertLoad` counts on the device, for every call, with fixed shapes and no host sync (it can
sit inside a captured CUDA graph):

    record(ids [T, K]):  counts[e] += #{(t, k) : ids[t, k] == e}   for e in [0, E)
                         ids outside [0, E) (-1 = padding) add nothing: index_add_ of
                         clamp(ids, 0, E - 1) with weight (0 <= ids < E)

`plan_replicas` is DeepSeek's published EPLB policy, written from its description. Given the
load of E logical experts, it fills P >= E physical slots, P / W on each of W ranks, spread over
N nodes whose ranks share fast links; the experts come in G groups (grouped top-k routing keeps
a token inside a few groups, so a group should stay on one node):

    if G % N: G = N = 1                       # the global variant: groups cannot split over nodes
    1. nodes:    load of a group = sum over its E/G experts; PACK the G groups onto N nodes, G/N each
    2. replicas: on each node, its E/N experts take its P/N slots: one each, then while a slot is
                 left, one more for argmax_e load[e] / copies[e] (ties: fewer copies, lower id)
    3. ranks:    on each node, PACK its P/N slots (a copy of e weighs load[e] / copies[e]) onto its
                 W/N ranks, P/W each; a rank lists its slots by logical id
    4. guard:    greedy packing is not optimal ([3, 3, 0, 2, 2, 2] on 2 ranks: 7 against 6 for the
                 contiguous blocks), so where E % W == 0 and the contiguous placement has a lower
                 largest rank load, take it (its spare slots hold copies of the rank's own experts)

    PACK(items, B bins, n/B per bin): heaviest item first (ties: lower index) into the lightest
                 bin that still has room (ties: lower bin)

`max_over_mean(load, plan)` = largest rank load / mean rank load, a logical expert's load split
evenly over its copies: the straggler factor of one layer's expert compute.

Not here yet (later slices): placement with replicas inside the comm backends (they read a
`Placement` of one copy per expert), moving weights in place, re-planning when a rank is lost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from epmoe.group import Placement


class ExpertLoad:
    """Tokens routed to each logical expert since the last `reset()`, kept on the device.

    counts: [E] int64 on `device`. Every method is a fixed-shape device op: no host sync and no
    allocation that depends on the ids' values, so `record` can be captured in a CUDA graph.
    """

    def __init__(self, num_experts: int, device: torch.device | str = "cpu") -> None:
        if num_experts <= 0:
            raise ValueError(f"ExpertLoad needs num_experts > 0, got {num_experts}")
        self.num_experts = num_experts
        self._counts = torch.zeros(num_experts, dtype=torch.int64, device=device)

    def record(self, ids: torch.Tensor) -> None:
        """Add the picks of ids [T, K] (int32 or int64, e.g. `Routing.ids`); ids outside [0, E),
        such as the -1 of padding rows, count for nothing (no check: checking would sync)."""
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ExpertLoad.record takes ids [T, K] int32, got {tuple(ids.shape)} {ids.dtype}")
        if ids.device != self._counts.device:
            raise ValueError(f"ids are on {ids.device}, the counts on {self._counts.device}: move the ids")
        flat = ids.reshape(-1)  # [T*K]
        valid = (flat >= 0) & (flat < self.num_experts)  # [T*K] bool
        self._counts.index_add_(0, flat.clamp(0, self.num_experts - 1).long(), valid.long())

    def counts(self) -> torch.Tensor:
        """[E] int64: the counts buffer itself (later records update it; clone to keep a snapshot)."""
        return self._counts

    def per_rank(self, placement: Placement) -> torch.Tensor:
        """[W] int64 on the device: tokens routed to each rank's experts under `placement`."""
        if placement.num_experts != self.num_experts:
            raise ValueError(f"placement has {placement.num_experts} experts, the counts {self.num_experts}")
        out = torch.zeros(placement.world, dtype=torch.int64, device=self._counts.device)
        return out.index_add_(0, placement.expert_rank.to(out.device, torch.int64), self._counts)

    def reset(self) -> None:
        """Zero the counts in place (the buffer keeps its address)."""
        self._counts.zero_()


@dataclass(frozen=True)
class ReplicaPlan:
    """Which logical expert each physical slot holds. Slots are rank-major: rank r holds slots
    [r * P/W, (r + 1) * P/W).

    phy2log:  [P] int32, logical expert of physical slot p
    log2phy:  [E, max copies] int32, the slots of expert e in ascending order, -1 = none
    replicas: [E] int32, copies of expert e (>= 1)
    phy_rank: [P] int32, rank of slot p (= p // (P/W))
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    replicas: torch.Tensor
    phy_rank: torch.Tensor
    num_ranks: int

    def __post_init__(self) -> None:
        for name in ("phy2log", "log2phy", "replicas", "phy_rank"):
            if getattr(self, name).dtype != torch.int32:
                raise ValueError(f"ReplicaPlan.{name} must be int32, got {getattr(self, name).dtype}")
        p, e = self.phy2log.numel(), self.replicas.numel()
        if self.num_ranks <= 0 or p % self.num_ranks or self.phy_rank.shape != (p,) or self.log2phy.shape[0] != e:
            raise ValueError(f"ReplicaPlan shapes do not agree: {p} slots, {self.num_ranks} ranks, {e} experts")

    @property
    def num_physical(self) -> int:
        return self.phy2log.numel()

    @property
    def num_experts(self) -> int:
        return self.replicas.numel()

    @property
    def slots_per_rank(self) -> int:
        return self.num_physical // self.num_ranks

    @classmethod
    def from_slots(cls, rank_slots: Sequence[Sequence[int]], num_experts: int) -> ReplicaPlan:
        """The plan whose rank r holds the logical experts rank_slots[r] (one entry per slot)."""
        phy2log = [e for slots in rank_slots for e in slots]
        where: list[list[int]] = [[] for _ in range(num_experts)]
        for p, e in enumerate(phy2log):
            where[e].append(p)
        if any(not w for w in where):
            raise ValueError(f"experts {[e for e, w in enumerate(where) if not w]} have no slot")
        width = max(len(w) for w in where)
        as32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
        return cls(as32(phy2log), as32([w + [-1] * (width - len(w)) for w in where]),
                   as32([len(w) for w in where]),
                   as32([r for r, slots in enumerate(rank_slots) for _ in slots]), len(rank_slots))

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int) -> ReplicaPlan:
        """One copy per expert, rank r holding [r * E/W, (r + 1) * E/W) (`Placement.contiguous`)."""
        per = Placement.contiguous(num_experts, num_ranks).local_experts
        return cls.from_slots([range(r * per, (r + 1) * per) for r in range(num_ranks)], num_experts)


def rank_loads(load: torch.Tensor | Sequence[float], plan: ReplicaPlan) -> torch.Tensor:
    """[W] float64: the load on each rank, a logical expert's load split evenly over its copies."""
    w = torch.as_tensor(load, dtype=torch.float64).cpu()
    if w.shape != (plan.num_experts,):
        raise ValueError(f"load must be [{plan.num_experts}], got {tuple(w.shape)}")
    log = plan.phy2log.long()
    per_slot = w[log] / plan.replicas.double()[log]  # [P]
    return torch.zeros(plan.num_ranks, dtype=torch.float64).index_add_(0, plan.phy_rank.long(), per_slot)


def max_over_mean(load: torch.Tensor | Sequence[float], plan: ReplicaPlan) -> float:
    """Largest rank load / mean rank load (>= 1; 1.0 where there is no load at all)."""
    r = rank_loads(load, plan)
    mean = r.mean().item()
    return r.max().item() / mean if mean > 0 else 1.0


def _pack(weights: Sequence[float], bins: int) -> list[int]:
    """PACK: the bin of each item, every bin getting len(weights) / bins items."""
    per, fill, total = len(weights) // bins, [0] * bins, [0.0] * bins
    where = [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):  # stable: ties keep the lower index
        b = min((b for b in range(bins) if fill[b] < per), key=lambda b: total[b])  # first of equals
        where[i], fill[b], total[b] = b, fill[b] + 1, total[b] + weights[i]
    return where


def _replicate(weights: Sequence[float], slots: int) -> list[int]:
    """Copies of each item filling `slots`: one each, then one more for the largest load per copy
    (ties: fewer copies, then the lower index, so zero loads spread their copies)."""
    copies = [1] * len(weights)
    for _ in range(slots - len(weights)):
        e = max(range(len(weights)), key=lambda e: (weights[e] / copies[e], -copies[e]))
        copies[e] += 1
    return copies


def plan_replicas(load: torch.Tensor | Sequence[float], num_physical: int, num_ranks: int, num_nodes: int = 1,
                  num_groups: int = 1) -> ReplicaPlan:
    """DeepSeek's EPLB (module docstring): P = `num_physical` slots over `num_ranks` ranks on
    `num_nodes` nodes for the [E] `load` (token counts or any non-negative weights), experts in
    `num_groups` groups (DeepSeek-V3: n_group = 8). Deterministic: the same input, the same plan."""
    w = torch.as_tensor(load, dtype=torch.float64).cpu()
    if w.dim() != 1 or not w.numel() or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"load must be a non-empty [E] of finite values >= 0, got shape {tuple(w.shape)}")
    e_count, wl = w.numel(), w.tolist()
    needs = {f"num_ranks={num_ranks} > 0, num_nodes={num_nodes} > 0": num_ranks > 0 and num_nodes > 0,
             f"num_physical={num_physical} >= E={e_count}": num_physical >= e_count,
             f"num_ranks={num_ranks} divisible by num_nodes={num_nodes}": num_ranks % num_nodes == 0,
             f"num_physical={num_physical} divisible by num_ranks={num_ranks}": num_physical % num_ranks == 0,
             f"E={e_count} divisible by num_groups={num_groups}": num_groups > 0 and e_count % num_groups == 0}
    for what, ok in needs.items():
        if not ok:
            raise ValueError(f"plan_replicas needs {what}")
    if num_groups % num_nodes:  # a group cannot sit on one node: the global variant
        num_nodes = num_groups = 1
    per_group, ranks_per_node = e_count // num_groups, num_ranks // num_nodes
    group_node = _pack([math.fsum(wl[g * per_group:(g + 1) * per_group]) for g in range(num_groups)], num_nodes)
    rank_slots: list[list[int]] = []
    for node in range(num_nodes):
        groups = [g for g in range(num_groups) if group_node[g] == node]
        experts = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        copies = dict(zip(experts, _replicate([wl[e] for e in experts], num_physical // num_nodes)))
        slots = [e for e in experts for _ in range(copies[e])]
        rank_of = _pack([wl[e] / copies[e] for e in slots], ranks_per_node)
        rank_slots += [sorted(e for e, r in zip(slots, rank_of) if r == rank) for rank in range(ranks_per_node)]
    plan = ReplicaPlan.from_slots(rank_slots, e_count)
    if e_count % num_ranks == 0:  # 4. guard: never worse than the contiguous blocks
        per, spare = e_count // num_ranks, num_physical // num_ranks
        blocks = [list(range(r * per, (r + 1) * per)) for r in range(num_ranks)]
        padded = [[e for e, c in zip(b, _replicate([wl[e] for e in b], spare)) for _ in range(c)] for b in blocks]
        fallback = ReplicaPlan.from_slots(padded, e_count)
        if rank_loads(w, fallback).max() < rank_loads(w, plan).max():
            plan = fallback
    return plan
