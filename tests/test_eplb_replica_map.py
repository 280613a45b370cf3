"""The replica-map kernel (`epmoe.ops.replica_map`, one launch) against its plain-torch twin and
against the mapping `ReplicaMap` made before the kernel (eight torch ops, kept below as the
oracle): integer outputs must match bit for bit, padding (-1, ids outside [0, E)) stays -1.

CPU: the kernel through the Triton interpreter. GPU (marked): the kernel on CUDA, and a
CUDA-graph replay that follows an in-place `ReplicaMap.load`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from epmoe.eplb import ReplicaMap, ReplicaPlan, plan_replicas
from epmoe.ops import launch
from epmoe.ops.replica_map import BLOCK, replica_map, replica_map_torch

ON_GPU = torch.cuda.is_available()


def mapping_before(plan: ReplicaPlan, rank: int, layout: str, ids: torch.Tensor) -> torch.Tensor:
    """The map as eplb.ReplicaMap computed it in plain torch before the kernel (the oracle)."""
    live = plan.log2phy[plan.log2phy >= 0].int()
    first = torch.cumsum(plan.replicas, 0, dtype=torch.int32) - plan.replicas
    T, E, W = ids.shape[0], plan.num_experts, plan.num_ranks
    e = ids.cpu().clamp(0, E - 1).long()
    t = torch.arange(T, dtype=torch.int64)[:, None]
    turn = t * W + rank if layout == "dp" else t
    slot = live[(first[e] + turn % plan.replicas[e]).long()]
    return torch.where((ids.cpu() >= 0) & (ids.cpu() < E), slot, -1).int()


def _plans() -> dict[str, ReplicaPlan]:
    skew = [1.0 / (i + 1) for i in range(16)]
    return {
        "one-copy": ReplicaPlan.contiguous(8, 4),  # every expert one copy
        "hot11": ReplicaPlan.from_slots([[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 3], [0, 0, 1, 2]], 4),  # 11 copies
        "eplb16": plan_replicas(skew, 24, 4),  # 1 to several copies
        "dsv3": plan_replicas([1.0 / (i + 1) for i in range(256)], 288, 8, num_nodes=2, num_groups=8),
        "one-rank": ReplicaPlan.from_slots([[0, 1, 1, 2, 2, 2]], 3),  # W = 1
    }


PLANS = _plans()


@dataclass(frozen=True)
class Case:
    plan: str
    T: int
    K: int
    layout: str = "dp"
    rank: int = 0
    ids: str = "random"  # random | one-expert (every pick on the hottest) | padded (-1 and bad ids mixed in)
    dtype: torch.dtype = torch.int32
    strided: bool = False  # ids a non-contiguous view

    @property
    def name(self) -> str:
        parts = [self.plan, f"T{self.T}", f"K{self.K}", self.layout, f"r{self.rank}", self.ids,
                 str(self.dtype).removeprefix("torch.")]
        return "-".join(parts + (["strided"] if self.strided else []))

    def make_ids(self) -> torch.Tensor:
        plan = PLANS[self.plan]
        E = plan.num_experts
        g = torch.Generator().manual_seed(self.T * 31 + self.K)
        ids = torch.randint(0, E, (self.T, self.K * (2 if self.strided else 1)), generator=g)
        if self.ids == "one-expert":
            ids.fill_(int(plan.replicas.argmax()))
        elif self.ids == "padded" and self.T:
            ids[::3] = -1  # padding rows
            flat = ids.view(-1)
            flat[1::7] = E  # one past the last expert
            flat[2::11] = -5
            flat[3::13] = 2**40 if self.dtype == torch.int64 else 2**31 - 1  # huge ids narrow to nothing valid
        ids = ids.to(self.dtype)
        return ids[:, ::2] if self.strided else ids


CASES = [
    Case("one-copy", 0, 4), Case("one-copy", 1, 4), Case("one-copy", 1, 1, "tp"), Case("one-copy", 33, 2, rank=3),
    Case("hot11", 0, 2, "tp"), Case("hot11", 1, 2, rank=2), Case("hot11", 64, 3, ids="one-expert", rank=1),
    Case("hot11", 64, 3, "tp", ids="one-expert"), Case("hot11", 17, 4, ids="padded", rank=3),
    Case("eplb16", 37, 4, rank=2), Case("eplb16", 37, 4, "tp"), Case("eplb16", 29, 5, ids="padded", dtype=torch.int64),
    Case("eplb16", 9, 3, rank=1, strided=True), Case("eplb16", 9, 3, "tp", ids="padded", strided=True),
    Case("eplb16", 300, 4, rank=3, dtype=torch.int64),  # 1200 picks: two programs
    Case("dsv3", 1, 8, rank=7), Case("dsv3", 129, 8, rank=5), Case("dsv3", 129, 8, "tp", ids="padded"),
    Case("dsv3", 64, 8, ids="one-expert", rank=6, dtype=torch.int64),
    Case("one-rank", 0, 2), Case("one-rank", 5, 2, ids="padded"), Case("one-rank", 40, 1, "tp", ids="one-expert"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_twin_and_map_equal_the_mapping_before(case: Case):
    plan, ids = PLANS[case.plan], case.make_ids()
    want = mapping_before(plan, case.rank, case.layout, ids)
    m = ReplicaMap(plan, case.rank, case.layout, "cpu", impl="triton")
    twin = replica_map_torch(ids, m.slots, m.first, m.copies, m.token_stride, m.offset)
    poisoned = torch.full(ids.shape, -99999, dtype=torch.int32)  # every element must be written
    kernel = replica_map(ids, m.slots, m.first, m.copies, m.token_stride, m.offset, out=poisoned, impl="triton")
    assert kernel is poisoned
    for got in (twin, kernel, m(ids), ReplicaMap(plan, case.rank, case.layout, "cpu")(ids)):
        assert got.dtype == torch.int32 and got.shape == ids.shape
        assert torch.equal(got, want), case.name
    valid = (ids >= 0) & (ids < plan.num_experts)
    assert bool((want[~valid] == -1).all())
    assert torch.equal(plan.phy2log[want[valid].long()].long(), ids[valid].long())  # a copy of its own expert


def test_one_launch_per_call(monkeypatch):
    """The kernel path is a single launch at any size (and none at 0 picks)."""
    launches = []
    real = launch.Launcher.launch

    def counted(self, grid, args, kwargs):
        launches.append(grid)
        real(self, grid, args, kwargs)

    monkeypatch.setattr(launch.Launcher, "launch", counted)
    m = ReplicaMap(PLANS["eplb16"], 1, "dp", "cpu", impl="triton")
    for T in (0, 1, 8, 2 * BLOCK):
        launches.clear()
        m(torch.zeros(T, 1, dtype=torch.int32))
        assert len(launches) == (1 if T else 0), T
    assert launches == [(2,)]


def test_load_reroutes_the_kernel_in_place():
    a, b = PLANS["eplb16"], plan_replicas([1.0 / (16 - i) for i in range(16)], 24, 4)
    ids = torch.randint(0, 16, (21, 4), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    m = ReplicaMap(a, 2, "dp", "cpu", impl="triton")
    assert torch.equal(m(ids), mapping_before(a, 2, "dp", ids))
    m.load(b)
    assert torch.equal(m(ids), mapping_before(b, 2, "dp", ids))


def test_bad_arguments_name_the_fix(monkeypatch):
    m = ReplicaMap(PLANS["eplb16"], 0, "dp", "cpu")
    args = (m.slots, m.first, m.copies, 4, 0)
    with pytest.raises(ValueError, match=r"ids \[T, K\] int32 or int64"):
        replica_map(torch.zeros(3, dtype=torch.int32), *args)
    with pytest.raises(ValueError, match=r"ids \[T, K\] int32 or int64"):
        replica_map(torch.zeros(3, 2), *args)
    with pytest.raises(ValueError, match="slots must be a contiguous 1-d int32"):
        replica_map(torch.zeros(3, 2, dtype=torch.int32), m.slots.long(), *args[1:])
    with pytest.raises(ValueError, match="out must be a contiguous int32 tensor of ids' shape"):
        replica_map(torch.zeros(3, 2, dtype=torch.int32), *args, out=torch.empty(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="layout must be 'dp' or 'tp'"):
        ReplicaMap(PLANS["eplb16"], 0, "ep", "cpu")
    with pytest.raises(ValueError, match="rank 4 is not one of the plan's 4 ranks"):
        ReplicaMap(PLANS["eplb16"], 4, "dp", "cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        replica_map(torch.zeros(3, 2, dtype=torch.int32), *args, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA device"):
        replica_map(torch.zeros(3, 2, dtype=torch.int32), *args, impl="triton")
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA device"):
        ReplicaMap(PLANS["eplb16"], 0, "dp", "cpu", impl="triton")  # at construction, not at the first call


def test_layer_with_replicas_through_the_kernel_equals_the_twin():
    """A one-rank layer with replicas: its map through the kernel (interpreter) and through the
    twin route every pick to the same slot, so the outputs are bitwise equal."""
    from epmoe import ExpertWeights, MoEConfig, MoELayer

    cfg = MoEConfig(hidden=16, intermediate=8, num_experts=12, top_k=3)
    full = ExpertWeights.random(cfg, cfg.num_experts, generator=torch.Generator().manual_seed(0))
    plan = plan_replicas([1.0 / (i + 1) for i in range(12)], 20, 1)
    layer = MoELayer.from_global(cfg, full, replicas=plan)
    assert layer._map.impl == "torch"  # the CPU default: the twin
    g = torch.Generator().manual_seed(1)
    x, logits = torch.randn(9, 16, generator=g), torch.randn(9, 12, generator=g)
    want = layer(x, logits)
    layer._map.impl = "triton"
    assert torch.equal(layer(x, logits), want)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_on_gpu_equals_the_mapping_before(case: Case):
    plan, ids = PLANS[case.plan], case.make_ids()
    m = ReplicaMap(plan, case.rank, case.layout, "cuda")  # auto: the kernel on CUDA
    got = m(ids.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), mapping_before(plan, case.rank, case.layout, ids)), case.name


@pytest.mark.gpu
def test_kernel_in_a_cuda_graph_follows_load():
    a, b = PLANS["dsv3"], plan_replicas([1.0 / (256 - i) for i in range(256)], 288, 8, num_nodes=2, num_groups=8)
    m = ReplicaMap(a, 5, "dp", "cuda")
    ids = torch.randint(0, 256, (64, 8), device="cuda", dtype=torch.int32)
    ids[-2:] = -1
    m(ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        out = m(ids)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), mapping_before(a, 5, "dp", ids.cpu()))
    m.load(b)
    ids.copy_(torch.randint(0, 256, (64, 8), device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), mapping_before(b, 5, "dp", ids.cpu()))
