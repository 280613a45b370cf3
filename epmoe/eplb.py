"""Expert load balancing: count the tokens each expert gets, and plan replicas of the hot ones.

`ExpertLoad` counts on the device, for every call, with fixed shapes and no host sync (it can
sit inside a captured CUDA graph):

    record(ids [T, K]):  counts[e] += #{(t, k) : ids[t, k] == e}   for e in [0, E)
                         ids outside [0, E) (-1 = padding) add nothing: index_add_ of
                         clamp(ids, 0, E - 1) with weight (0 <= ids < E)
    per_rank(placement):  [W] int64, counts summed over each rank's experts
    per_rank(plan):       [W] float64, sum over rank r's slots p of counts[e_p] / copies[e_p]
                          (a ReplicaPlan: each expert's count split evenly over its copies)

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

A layer with replicas (`MoELayer(..., replicas=plan)`) runs its comm backends on physical ids:
they read `plan.placement()` (slot p on rank p // (P/W)) and `physical_config(cfg, P)`, and
`ReplicaMap` turns each call's logical routing ids into slots after routing (weights unchanged):

    copies = replicas[e];  c = (t * W + rank) % copies   (tp layout: t % copies, alike on every rank)
    slot   = the c-th slot of e (ascending)

(one Triton launch on CUDA: epmoe/ops/replica_map.py, the plain-torch twin elsewhere), so each
copy gets 1 / copies of its expert's picks, the share `plan_replicas` counts on (rejected:
preferring a copy on the token's own rank saves traffic, but a rank holding 2 of an expert's 6
copies then gets only its own tokens of it, 1/4 of them over 4 ranks, not the 1/3 planned).

`MoELayer.rebalance(plan)` installs a new plan in place: `align_plan` keeps every expert a rank
keeps in its old slot, `plan_moves` lists one copy per slot whose expert changes (from the same
rank where it holds that expert, else from the old holders in turn), and `move_expert_weights`
copies those rows with one all_to_all_v. `surviving_plan(plan, lost)` is the plan of the ranks
left after some are lost (`ExpertsLostError` names the experts no survivor holds);
`MoELayer.without_ranks` rebuilds the layer over the survivors' group with it.

`plan_replicas(..., min_ranks=2)` puts every expert on two ranks or more: the cover a lost rank
needs (without it an expert's copies may share one rank).

Not here yet: rebalancing while a call is in flight (it is a collective call between layer
calls, on every rank); replacing a lost rank's slots from the checkpoint instead of copies.
"""

from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from epmoe.comm.base import agree
from epmoe.config import MoEConfig
from epmoe.experts.base import ExpertWeights
from epmoe.group import Placement, RankGroup
from epmoe.ops.combine import pick_impl
from epmoe.ops.replica_map import check_tables, replica_map


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

    def per_rank(self, where: Placement | ReplicaPlan) -> torch.Tensor:
        """[W] on the device: the counted picks each rank serves, for either kind of layout.

            Placement (one copy per expert):  int64, exact: sum of counts[e] over rank r's experts
            ReplicaPlan (replicas):           float64, each expert's count split evenly over its
                                              copies (what `ReplicaMap`'s turns give each copy on
                                              average, and what `plan_replicas` balances):
                                              sum over r's slots p of counts[e_p] / copies[e_p]

        The counts are of logical experts (`record` sees the routing before the map), so a plan's
        numbers are shares, not exact per-copy counts; a one-copy plan gives the Placement's
        numbers as floats. Equal to `rank_loads(counts(), plan)` (CPU) up to float64 rounding.
        Device ops only (the plan's tables are copied to the device): no host sync."""
        if isinstance(where, ReplicaPlan):
            if where.num_experts != self.num_experts:
                raise ValueError(f"plan has {where.num_experts} experts, the counts {self.num_experts}")
            return _slot_shares(self._counts.double(), where).view(where.num_ranks, -1).sum(1)  # slots rank-major
        if not isinstance(where, Placement):
            raise TypeError(f"per_rank takes a Placement or a ReplicaPlan (epmoe.eplb), got {type(where).__name__}")
        if where.num_experts != self.num_experts:
            raise ValueError(f"placement has {where.num_experts} experts, the counts {self.num_experts}")
        out = torch.zeros(where.world, dtype=torch.int64, device=self._counts.device)
        return out.index_add_(0, where.expert_rank.to(out.device, torch.int64), self._counts)

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

    def rank_experts(self, rank: int) -> torch.Tensor:
        """[P/W] int64: the logical expert of each of `rank`'s slots, by local slot index (the
        order of that rank's `ExpertWeights`; an expert with two copies there appears twice)."""
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"rank {rank} is not one of the plan's {self.num_ranks} ranks")
        s = self.slots_per_rank
        return self.phy2log[rank * s:(rank + 1) * s].long()

    def placement(self) -> Placement:
        """What the comm backends read: physical slot p on rank p // (P/W) at local index p % (P/W)."""
        return Placement.contiguous(self.num_physical, self.num_ranks)

    def code(self) -> int:
        """The plan as one int (crc32 of its ranks and slots), for cross-rank agreement."""
        return zlib.crc32(repr((self.num_ranks, self.phy2log.tolist())).encode())

    @classmethod
    def from_placement(cls, placement: Placement) -> ReplicaPlan:
        """The one-copy plan of `placement` (rank r's slots: its experts by local index)."""
        return cls.from_slots([placement.global_ids(r).tolist() for r in range(placement.world)],
                              placement.num_experts)

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


def _slot_shares(load: torch.Tensor, plan: ReplicaPlan) -> torch.Tensor:
    """[P] float64 on load's device: each slot's share of its expert's load (split evenly over
    the expert's copies)."""
    log = plan.phy2log.to(load.device, torch.int64)
    return load[log] / plan.replicas.to(load.device, torch.float64)[log]


def rank_loads(load: torch.Tensor | Sequence[float], plan: ReplicaPlan) -> torch.Tensor:
    """[W] float64 on the CPU: the load on each rank, a logical expert's load split evenly over
    its copies (`ExpertLoad.per_rank(plan)` is the same on the device, from the counters)."""
    w = torch.as_tensor(load, dtype=torch.float64).cpu()
    if w.shape != (plan.num_experts,):
        raise ValueError(f"load must be [{plan.num_experts}], got {tuple(w.shape)}")
    return torch.zeros(plan.num_ranks, dtype=torch.float64).index_add_(0, plan.phy_rank.long(), _slot_shares(w, plan))


def max_over_mean(load: torch.Tensor | Sequence[float], plan: ReplicaPlan) -> float:
    """Largest rank load / mean rank load (>= 1; 1.0 where there is no load at all)."""
    r = rank_loads(load, plan)
    mean = r.mean().item()
    return r.max().item() / mean if mean > 0 else 1.0


def _pack(weights: Sequence[float], bins: int, keys: Sequence[int] | None = None) -> list[int]:
    """PACK: the bin of each item, every bin getting len(weights) / bins items; with `keys`, a bin
    that holds no item of the same key first (copies of one expert on different ranks)."""
    per, fill, total = len(weights) // bins, [0] * bins, [0.0] * bins
    where, held = [0] * len(weights), [set() for _ in range(bins)]
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):  # stable: ties keep the lower index
        key = keys[i] if keys is not None else None
        b = min((b for b in range(bins) if fill[b] < per),
                key=lambda b, key=key: (key is not None and key in held[b], total[b]))  # first of equals
        where[i], fill[b], total[b] = b, fill[b] + 1, total[b] + weights[i]
        held[b].add(key)
    return where


def _replicate(weights: Sequence[float], slots: int, base: int = 1) -> list[int]:
    """Copies of each item filling `slots`: `base` each, then one more for the largest load per
    copy (ties: fewer copies, then the lower index, so zero loads spread their copies)."""
    copies = [base] * len(weights)
    for _ in range(slots - base * len(weights)):
        e = max(range(len(weights)), key=lambda e: (weights[e] / copies[e], -copies[e]))
        copies[e] += 1
    return copies


def plan_replicas(load: torch.Tensor | Sequence[float], num_physical: int, num_ranks: int, num_nodes: int = 1,
                  num_groups: int = 1, min_ranks: int = 1) -> ReplicaPlan:
    """DeepSeek's EPLB (module docstring): P = `num_physical` slots over `num_ranks` ranks on
    `num_nodes` nodes for the [E] `load` (token counts or any non-negative weights), experts in
    `num_groups` groups (DeepSeek-V3: n_group = 8). Deterministic: the same input, the same plan.

    min_ranks > 1: every expert on at least that many ranks of its node, so the plan survives
    the loss of min_ranks - 1 ranks (`surviving_plan`): step 2 starts from min_ranks copies each
    (P >= min_ranks * E), step 3 puts an expert's copies on ranks without one first, step 4 is
    skipped; a ValueError where the packing could not spread some expert."""
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
    if not 1 <= min_ranks <= ranks_per_node or num_physical < min_ranks * e_count:
        raise ValueError(f"plan_replicas needs 1 <= min_ranks={min_ranks} <= {ranks_per_node} ranks per node and "
                         f"num_physical={num_physical} >= min_ranks * E = {min_ranks * e_count}")
    group_node = _pack([math.fsum(wl[g * per_group:(g + 1) * per_group]) for g in range(num_groups)], num_nodes)
    rank_slots: list[list[int]] = []
    for node in range(num_nodes):
        groups = [g for g in range(num_groups) if group_node[g] == node]
        experts = [e for g in groups for e in range(g * per_group, (g + 1) * per_group)]
        copies = dict(zip(experts, _replicate([wl[e] for e in experts], num_physical // num_nodes, min_ranks)))
        slots = [e for e in experts for _ in range(copies[e])]
        rank_of = _pack([wl[e] / copies[e] for e in slots], ranks_per_node, slots if min_ranks > 1 else None)
        rank_slots += [sorted(e for e, r in zip(slots, rank_of) if r == rank) for rank in range(ranks_per_node)]
    plan = ReplicaPlan.from_slots(rank_slots, e_count)
    if min_ranks > 1:
        spread = [len({int(p) // plan.slots_per_rank for p in plan.log2phy[e][: int(plan.replicas[e])]})
                  for e in range(e_count)]
        short = [e for e in range(e_count) if spread[e] < min_ranks]
        if short:
            raise ValueError(f"plan_replicas could not put experts {short} on {min_ranks} ranks; give it more "
                             "slots (num_physical)")
        return plan
    if e_count % num_ranks == 0:  # 4. guard: never worse than the contiguous blocks
        per, spare = e_count // num_ranks, num_physical // num_ranks
        blocks = [list(range(r * per, (r + 1) * per)) for r in range(num_ranks)]
        padded = [[e for e, c in zip(b, _replicate([wl[e] for e in b], spare)) for _ in range(c)] for b in blocks]
        fallback = ReplicaPlan.from_slots(padded, e_count)
        if rank_loads(w, fallback).max() < rank_loads(w, plan).max():
            plan = fallback
    return plan


def physical_config(cfg: MoEConfig, num_physical: int) -> MoEConfig:
    """What the comm backends of a layer with `num_physical` slots see: a config of that many
    experts (the ids they move are slots), expert groups dropped (backends never route, and P
    need not divide into the groups). `cfg` itself where P == E."""
    if num_physical == cfg.num_experts:
        return cfg
    return cfg.replace(num_experts=num_physical, n_group=1, topk_group=1)


class ReplicaMap:
    """Logical routing ids -> physical slots on the device: fixed shapes, no host sync, so the
    step sits inside a captured CUDA graph (module docstring for the choice of copy). One Triton
    launch on CUDA (`epmoe.ops.replica_map`), its plain-torch twin elsewhere; `impl` as there
    ("auto", "triton": also on the CPU under TRITON_INTERPRET=1, "torch"), bit-equal results.

    slots [P] int32 (each expert's slots in ascending order, expert by expert), first [E] int32
    (where expert e's slots start), copies [E] int32. `load(plan)` rewrites them in place, so
    graphs captured over them route by the new plan.
    """

    def __init__(self, plan: ReplicaPlan, rank: int, layout: str, device: torch.device | str,
                 impl: str = "auto") -> None:
        if layout not in ("dp", "tp"):
            raise ValueError(f"ReplicaMap layout must be 'dp' or 'tp', got {layout!r}")
        if not 0 <= rank < plan.num_ranks:
            raise ValueError(f"rank {rank} is not one of the plan's {plan.num_ranks} ranks")
        self.rank, self.layout = rank, layout
        self.impl = pick_impl(impl, torch.device(device))  # "triton" or "torch", fixed with the device
        self.num_experts, self.num_ranks = plan.num_experts, plan.num_ranks
        # the turn of token t: t * W + rank (dp: each rank's tokens take their own turns), t (tp)
        self.token_stride, self.offset = (plan.num_ranks, rank) if layout == "dp" else (1, 0)
        self.slots, self.first, self.copies = (t.to(device) for t in self._tables(plan))
        check_tables(self.slots, self.first, self.copies, self.slots.device)  # once: calls check only the ids

    def _tables(self, plan: ReplicaPlan) -> tuple[torch.Tensor, ...]:
        if (plan.num_experts, plan.num_ranks) != (self.num_experts, self.num_ranks):
            raise ValueError(f"a plan of {plan.num_experts} experts on {plan.num_ranks} ranks cannot replace one of "
                             f"{self.num_experts} on {self.num_ranks}")
        live = plan.log2phy[plan.log2phy >= 0]  # row-major: expert by expert, ascending slots
        first = torch.cumsum(plan.replicas, 0, dtype=torch.int32) - plan.replicas
        return live.int().contiguous(), first, plan.replicas.clone()

    def load(self, plan: ReplicaPlan) -> None:
        """Route by `plan` from the next call on (the tables rewritten in place; same E and W)."""
        for dst, src in zip((self.slots, self.first, self.copies), self._tables(plan)):
            dst.copy_(src)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T, K] int32 (or int64) logical experts (-1 = padding) -> [T, K] int32 physical
        slots (-1 kept): slot = the ((t * W + rank) % copies)-th slot of the expert (tp: t % copies)."""
        return replica_map(ids, self.slots, self.first, self.copies, self.token_stride, self.offset, impl=self.impl,
                           check_tables=False)


def align_plan(new: ReplicaPlan, old: ReplicaPlan) -> ReplicaPlan:
    """`new` with each rank's slots reordered so that what a rank keeps stays where it was:

        for each rank r:  want = the experts of r's slots under new (a multiset)
            slot s keeps old[s] while want still holds a copy of it
            the rest of want, ascending, fills r's other slots in order

    Every rank holds the same experts as under `new`; only slots whose expert changes differ
    from `old` (the fewest a rank can change)."""
    if (new.num_experts, new.num_physical, new.num_ranks) != (old.num_experts, old.num_physical, old.num_ranks):
        raise ValueError(f"the new plan has {new.num_experts} experts in {new.num_physical} slots on {new.num_ranks} "
                         f"ranks, the layer's {old.num_experts} in {old.num_physical} on {old.num_ranks}: a rebalance "
                         "keeps E, P and W (build a new layer to change them)")
    rank_slots = []
    for r in range(new.num_ranks):
        want = Counter(new.rank_experts(r).tolist())
        kept: list[int | None] = []
        for e in old.rank_experts(r).tolist():
            kept.append(e if want[e] > 0 else None)
            want[e] -= kept[-1] is not None
        rest = iter(sorted(want.elements()))
        rank_slots.append([e if e is not None else next(rest) for e in kept])
    return ReplicaPlan.from_slots(rank_slots, new.num_experts)


@dataclass(frozen=True)
class SlotMove:
    """One expert copy a rebalance makes: slot `dst` gets the weights old slot `src` holds."""

    dst: int  # physical slot (of the new plan) whose expert changes
    src: int  # physical slot holding `expert` under the old plan
    expert: int  # logical expert


def plan_moves(old: ReplicaPlan, new: ReplicaPlan) -> list[SlotMove]:
    """The copies that turn `old`'s slots into `new`'s (align `new` first: `align_plan`), by dst:
    one per slot whose expert changes; its source is a slot of that expert on the same rank
    where there is one (no traffic), else the expert's old slots taken in turn (spreading the sends)."""
    S, turn, moves = old.slots_per_rank, Counter(), []
    for p, (was, e) in enumerate(zip(old.phy2log.tolist(), new.phy2log.tolist())):
        if was == e:
            continue
        holders = old.log2phy[e][: int(old.replicas[e])].tolist()
        home = [q for q in holders if q // S == p // S]
        src = home[0] if home else holders[turn[e] % len(holders)]
        turn[e] += not home
        moves.append(SlotMove(p, src, e))
    return moves


@dataclass(frozen=True)
class Rebalanced:
    """What a rebalance did, seen from one rank."""

    plan: ReplicaPlan  # the plan installed (the one asked for, aligned: `align_plan`)
    moved: int  # slots whose expert changed, over all ranks
    changed: int  # of them, this rank's slots
    received: int  # of this rank's, copied from another rank (the rest from its own slots)
    sent: int  # expert copies this rank sent to other ranks


def _slot_bytes(weights: ExpertWeights, slots: int) -> list[torch.Tensor]:
    """Every tensor of `weights` with one entry per slot, as [slots, bytes] uint8 views (writes
    through them land in the weights)."""
    out = []
    for name in ("w13", "w2", "b13", "b2"):
        t = getattr(weights, name)
        parts = [] if t is None else [(name, t)] if isinstance(t, torch.Tensor) else [
            (f"{name}.{f}", getattr(t, f)) for f in ("data", "scales", "global_scale") if getattr(t, f) is not None]
        for what, p in parts:
            if p.dim() == 0 or p.shape[0] != slots:
                raise ValueError(f"expert weight {what} has shape {tuple(p.shape)}, not one entry per slot ({slots}): "
                                 "a rebalance moves each expert's own tensors; expand shared scales per expert "
                                 "(the runner's prepare does) before building the layer")
            if not p.is_contiguous():
                raise ValueError(f"expert weight {what} is not contiguous; a rebalance writes rows in place: pass "
                                 "contiguous weights (.contiguous()) when building the layer")
            out.append(p.view(torch.uint8).view(slots, -1))
    return out


def move_expert_weights(weights: ExpertWeights, old: ReplicaPlan, new: ReplicaPlan,
                        group: RankGroup | None) -> Rebalanced:
    """On every rank of `group` (each with its own `weights`, the slots of `old`): agree on the
    plans, then turn the weights into those of `new` in place, copying only the slots whose
    expert changes (`plan_moves`; remote copies in one all_to_all_v of byte rows). Returns what
    moved; `new` is aligned first (`align_plan`), and the aligned plan is what now holds."""
    rank, world = (group.rank, group.world) if group is not None else (0, 1)
    failure, moves, aligned = None, [], new
    try:
        if old.num_ranks != world:
            raise ValueError(f"the layer's plan spans {old.num_ranks} ranks, its group {world}")
        aligned = align_plan(new, old)
        moves = plan_moves(old, aligned)
        rows = _slot_bytes(weights, old.slots_per_rank)
    except Exception as exc:  # noqa: BLE001 - re-raised by agree, after the peers are told
        failure = exc
    device = torch.device("cuda", torch.cuda.current_device()) if group is not None and group.backend == "nccl" \
        else "cpu"
    agree(group, f"rebalance on rank {rank}", {"new plan": new.code(), "old plan": old.code()}, device=device,
          failure=failure, fix="Call rebalance on every rank with the same plan")
    S = old.slots_per_rank
    on = lambda m, r: m // S == r  # noqa: E731 - slot m lies on rank r
    mine = [m for m in moves if on(m.dst, rank)]
    local = [m for m in mine if on(m.src, rank)]
    sends = [[m for m in moves if on(m.src, rank) and on(m.dst, j)] if j != rank else [] for j in range(world)]
    recvs = [[m for m in mine if on(m.src, i)] if i != rank else [] for i in range(world)]
    dev = weights.device

    def take(slots: list[int]) -> torch.Tensor:  # [n, bytes of one slot] copied out before any write
        idx = torch.tensor(slots, dtype=torch.long, device=dev)
        return torch.cat([r[idx] for r in rows], dim=1)

    def put(slots: list[int], data: torch.Tensor) -> None:
        idx, col = torch.tensor(slots, dtype=torch.long, device=dev), 0
        for r in rows:
            r[idx] = data[:, col:col + r.shape[1]]
            col += r.shape[1]

    outgoing = take([m.src % S for s in sends for m in s])
    home = take([m.src % S for m in local])
    if moves and world > 1:  # every rank computed the same moves: all enter the exchange, or none
        got = group.all_to_all_v(outgoing, [len(s) for s in sends], [len(r) for r in recvs])
        put([m.dst % S for r in recvs for m in r], got)
    put([m.dst % S for m in local], home)
    return Rebalanced(aligned, len(moves), len(mine), len(mine) - len(local), sum(len(s) for s in sends))


class ExpertsLostError(ValueError):
    """The lost ranks held every copy of some experts: `experts` lists them, `ranks` the lost ranks."""

    def __init__(self, message: str, experts: list[int], ranks: list[int]) -> None:
        super().__init__(message)
        self.experts, self.ranks = experts, ranks


def surviving_plan(plan: ReplicaPlan, lost: Sequence[int]) -> ReplicaPlan:
    """The plan of the ranks left when `lost` are gone: the survivors keep their slots, in their
    old order (survivor i becomes rank i). `ExpertsLostError` where some expert had every copy on
    a lost rank, listing them."""
    gone_ranks = sorted({int(r) for r in lost})
    if not gone_ranks or any(not 0 <= r < plan.num_ranks for r in gone_ranks) or len(gone_ranks) == plan.num_ranks:
        raise ValueError(f"lost must name some but not all of the plan's ranks 0..{plan.num_ranks - 1}, "
                         f"got {list(lost)}")
    keep = [r for r in range(plan.num_ranks) if r not in gone_ranks]
    slots = [plan.rank_experts(r).tolist() for r in keep]
    held = {e for s in slots for e in s}
    missing = [e for e in range(plan.num_experts) if e not in held]
    if missing:
        raise ExpertsLostError(
            f"ranks {gone_ranks} held every copy of experts {missing}: the {len(keep)} surviving ranks cannot serve "
            "them. Plan replicas so that every expert has copies on two ranks or more, or reload those experts "
            "from the checkpoint",
            missing, gone_ranks)
    return ReplicaPlan.from_slots(slots, plan.num_experts)
