"""Expert load balancing (epmoe/eplb.py): the device counters against a plain count, and the
replica planner's invariants, determinism and balance on skewed, uniform and degenerate loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from epmoe import Placement
from epmoe.bench.eplb import TRACES
from epmoe.eplb import ExpertLoad, ReplicaPlan, max_over_mean, plan_replicas, rank_loads

# --- counters ---


def plain_count(batches: list[torch.Tensor], num_experts: int) -> torch.Tensor:
    """[E] int64: picks per expert, ids outside [0, E) left out, by a Python loop."""
    out = [0] * num_experts
    for ids in batches:
        for e in ids.flatten().tolist():
            if 0 <= e < num_experts:
                out[e] += 1
    return torch.tensor(out, dtype=torch.int64)


def _ids(tokens: int, k: int, num_experts: int, seed: int, pad_rows: int = 0) -> torch.Tensor:
    """[T, K] int32 distinct experts per row; the last `pad_rows` rows -1 (padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(tokens, num_experts, generator=g).argsort(dim=1)[:, :k].int()
    ids[tokens - pad_rows:] = -1
    return ids


@dataclass(frozen=True)
class CountCase:
    name: str
    batches: list[torch.Tensor]  # ids [T, K] of each record() call
    num_experts: int


COUNT_CASES = [
    CountCase("0 tokens", [torch.empty(0, 8, dtype=torch.int32)], 256),
    CountCase("1 token", [_ids(1, 8, 256, 0)], 256),
    CountCase("padding -1", [_ids(9, 4, 16, 1, pad_rows=3), torch.tensor([[2, -1], [-1, -1]], dtype=torch.int32)],
              16),
    CountCase("all tokens to one expert", [torch.full((129, 1), 5, dtype=torch.int32)], 8),
    CountCase("several records, odd sizes", [_ids(t, 8, 256, t) for t in (3, 129, 1, 0, 2880)], 256),
    CountCase("int64 ids", [_ids(17, 2, 8, 3).long()], 8),
]


@pytest.mark.parametrize("case", COUNT_CASES, ids=lambda c: c.name)
def test_counts_match_a_plain_count(case):
    load = ExpertLoad(case.num_experts)
    buffer = load.counts()
    for ids in case.batches:
        load.record(ids)
    want = plain_count(case.batches, case.num_experts)
    assert torch.equal(load.counts(), want)
    assert load.counts().data_ptr() == buffer.data_ptr()  # the same buffer, updated in place
    assert int(want.sum()) == sum(int((ids >= 0).sum()) for ids in case.batches)


def test_reset_zeroes_in_place_and_counting_starts_again():
    load = ExpertLoad(16)
    for seed in range(3):
        load.record(_ids(33, 4, 16, seed, pad_rows=5))
    buffer = load.counts()
    assert int(buffer.sum()) == 3 * 28 * 4
    load.reset()
    assert load.counts().data_ptr() == buffer.data_ptr()
    assert not buffer.any()
    again = _ids(7, 4, 16, 9)
    load.record(again)
    assert torch.equal(buffer, plain_count([again], 16))


def test_per_rank_sums_each_ranks_experts():
    load, ids = ExpertLoad(16), _ids(100, 4, 16, 4, pad_rows=10)
    load.record(ids)
    placement = Placement.contiguous(16, 4)
    assert torch.equal(load.per_rank(placement), plain_count([ids], 16).view(4, 4).sum(1))
    with pytest.raises(ValueError, match="experts"):
        load.per_rank(Placement.contiguous(8, 4))


def test_per_rank_of_a_replica_plan_splits_each_expert_over_its_copies():
    load, ids = ExpertLoad(16), _ids(100, 4, 16, 4, pad_rows=10)
    load.record(ids)
    counts = plain_count([ids], 16)
    plan = plan_replicas(counts.double(), 24, 4)
    got = load.per_rank(plan)
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert torch.allclose(got, rank_loads(counts, plan), rtol=1e-12, atol=0)
    assert got.sum().item() == pytest.approx(counts.sum().item(), rel=1e-12)  # every pick served once
    shared = ExpertLoad(3)
    shared.record(torch.tensor([[0, 1], [0, 2], [0, -1], [0, 2]], dtype=torch.int32))  # counts [4, 1, 2]
    assert shared.per_rank(ReplicaPlan.from_slots([[0, 1], [0, 2]], 3)).tolist() == [3.0, 4.0]
    one_copy = Placement.contiguous(16, 4)  # a one-copy plan: the Placement's counts, as floats
    assert torch.equal(load.per_rank(ReplicaPlan.from_placement(one_copy)), load.per_rank(one_copy).double())
    with pytest.raises(ValueError, match="plan has 8 experts, the counts 16"):
        load.per_rank(ReplicaPlan.contiguous(8, 4))
    with pytest.raises(TypeError, match="per_rank takes a Placement or a ReplicaPlan"):
        load.per_rank([0, 1, 2, 3])


@pytest.mark.gpu
def test_per_rank_of_a_plan_on_the_device():
    load = ExpertLoad(256, "cuda")
    load.record(torch.randint(0, 256, (512, 8), device="cuda", dtype=torch.int32))
    plan = plan_replicas(load.counts().cpu().double(), 288, 8)
    got = load.per_rank(plan)
    assert got.is_cuda and torch.allclose(got.cpu(), rank_loads(load.counts().cpu(), plan), rtol=1e-12, atol=0)


@pytest.mark.gpu
def test_record_runs_inside_a_cuda_graph():
    """Fixed shapes, no host sync: one capture, replays with new ids (padding included) count them."""
    load, ids = ExpertLoad(256, "cuda"), torch.full((64, 8), -1, dtype=torch.int32, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        load.record(ids)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        load.record(ids)
    load.reset()
    batches = [_ids(64, 8, 256, seed, pad_rows=seed) for seed in range(3)]
    for b in batches:
        ids.copy_(b)
        graph.replay()
    assert torch.equal(load.counts().cpu(), plain_count(batches, 256))


def test_record_refuses_what_is_not_ids_t_k():
    load = ExpertLoad(8)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        load.record(torch.zeros(5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        load.record(torch.zeros(5, 2))


# --- planner ---


def zipf(num_experts: int, seed: int | None = None) -> torch.Tensor:
    """[E] popularity ~ 1 / rank; with a seed, ranks assigned to experts at random."""
    load = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64)
    return load if seed is None else load[torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))]


def skewed(num_experts: int, seed: int) -> torch.Tensor:
    """[E] random loads, a few large: 1000 * U(0, 1)^3."""
    return torch.rand(num_experts, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 3 * 1000


@dataclass(frozen=True)
class PlanCase:
    name: str
    load: torch.Tensor  # [E]
    num_physical: int
    num_ranks: int
    num_nodes: int = 1
    num_groups: int = 1
    bound: float | None = None  # max/mean must stay at or below this
    same_as: dict = field(default_factory=dict)  # plan_replicas arguments giving the same plan


# deepseek-v3 shapes: 256 experts in 8 groups, 8 ranks, 32 redundant. Measured max/mean (the
# issue's target is 1.1): zipf 1.00007 (contiguous 5.30), shuffled zipf 1.00007 (contiguous 2.41),
# shuffled zipf on 2 nodes 1.054 (copies stay in their node).
PLAN_CASES = [
    PlanCase("zipf, deepseek-v3", zipf(256), 288, 8, bound=1.1),
    PlanCase("zipf shuffled, deepseek-v3", zipf(256, 0), 288, 8, bound=1.1),
    PlanCase("zipf shuffled, 2 nodes x 8 groups", zipf(256, 0), 288, 8, 2, 8, bound=1.1),
    PlanCase("zipf, 4 nodes x 8 groups", zipf(256, 1), 288, 8, 4, 8),
    PlanCase("uniform", torch.ones(256), 288, 8, bound=1 + 1e-12),
    PlanCase("uniform, 2 nodes", torch.full((256,), 7.0), 288, 8, 2, 8, bound=1 + 1e-12),
    PlanCase("num_physical == E", zipf(64, 2), 64, 8),
    PlanCase("num_physical == E, uniform", torch.ones(64), 64, 8, bound=1 + 1e-12),
    PlanCase("one hot expert", torch.tensor([0.0] * 255 + [1000.0]), 288, 8),
    PlanCase("loads all zero", torch.zeros(256), 288, 8, bound=1.0),
    PlanCase("greedy packing loses to contiguous", torch.tensor([3.0, 3, 0, 2, 2, 2]), 6, 2, bound=1.0),
    PlanCase("E not divisible by nodes: global", zipf(10, 3), 12, 4, 4, 5, same_as={"num_nodes": 1, "num_groups": 1}),
    PlanCase("groups not divisible by nodes: global", zipf(24, 4), 32, 4, 2, 3,
             same_as={"num_nodes": 1, "num_groups": 1}),
    *(PlanCase(f"random {e} experts, {w} ranks, {r} redundant", skewed(e, s), e + r, w)
      for s, (e, w, r) in enumerate([(8, 2, 0), (16, 4, 4), (64, 8, 8), (12, 4, 0), (256, 8, 32), (160, 32, 32),
                                     (6, 3, 3)])),
]


def check_plan(plan: ReplicaPlan, num_experts: int, num_physical: int, num_ranks: int) -> None:
    """The invariants every plan keeps."""
    slots = num_physical // num_ranks
    assert (plan.num_physical, plan.num_experts, plan.num_ranks) == (num_physical, num_experts, num_ranks)
    assert bool((plan.replicas >= 1).all())
    assert torch.equal(plan.replicas.long(), torch.bincount(plan.phy2log.long(), minlength=num_experts))
    assert torch.equal(torch.bincount(plan.phy_rank.long(), minlength=num_ranks), torch.full((num_ranks,), slots))
    assert torch.equal(plan.phy_rank.long(), torch.arange(num_physical) // slots)
    for e in range(num_experts):
        where = plan.log2phy[e][: int(plan.replicas[e])]
        assert bool((plan.log2phy[e][int(plan.replicas[e]):] == -1).all())
        assert where.tolist() == sorted(where.tolist())
        assert bool((plan.phy2log[where.long()] == e).all())


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: c.name)
def test_plan_keeps_its_invariants_and_beats_contiguous(case):
    args = (case.num_physical, case.num_ranks, case.num_nodes, case.num_groups)
    plan = plan_replicas(case.load, *args)
    e = case.load.numel()
    check_plan(plan, e, case.num_physical, case.num_ranks)
    again = plan_replicas(case.load.tolist(), *args)  # deterministic, whatever the load's type
    assert all(torch.equal(getattr(plan, f), getattr(again, f)) for f in ("phy2log", "log2phy", "replicas"))
    ratio = max_over_mean(case.load, plan)
    if e % case.num_ranks == 0:
        assert ratio <= max_over_mean(case.load, ReplicaPlan.contiguous(e, case.num_ranks)) + 1e-12
    if case.bound is not None:
        assert ratio <= case.bound, f"max/mean {ratio:.4f} > {case.bound}"
    if case.same_as:
        other = plan_replicas(case.load, case.num_physical, case.num_ranks, **case.same_as)
        assert torch.equal(plan.phy2log, other.phy2log)


@pytest.mark.parametrize("nodes", [2, 4])
def test_hierarchical_plan_keeps_groups_and_copies_on_one_node(nodes):
    load, groups, ranks = zipf(256, 5), 8, 8
    plan = plan_replicas(load, 288, ranks, nodes, groups)
    node_of_slot = plan.phy_rank.long() // (ranks // nodes)
    node_of_expert = node_of_slot[plan.log2phy[:, 0].long()]  # [E]
    for e in range(256):  # every copy of e on the node of its first copy
        assert bool((node_of_slot[plan.log2phy[e][: int(plan.replicas[e])].long()] == node_of_expert[e]).all())
    per_group = node_of_expert.view(groups, -1)
    assert bool((per_group == per_group[:, :1]).all())  # a group's experts share one node
    assert torch.equal(torch.bincount(per_group[:, 0], minlength=nodes), torch.full((nodes,), groups // nodes))


@pytest.mark.parametrize(("args", "min_ranks"), [
    ((zipf(256, 0), 512, 8), 2), ((zipf(256, 0), 576, 8, 2, 8), 2), ((zipf(24, 1), 48, 3), 2),
    ((torch.ones(16), 48, 4), 3), ((torch.zeros(8), 16, 2), 2)])
def test_min_ranks_spreads_every_expert_so_a_lost_rank_leaves_a_copy(args, min_ranks):
    from epmoe.eplb import surviving_plan

    plan = plan_replicas(*args, min_ranks=min_ranks)
    check_plan(plan, args[0].numel(), args[1], args[2])
    S = plan.slots_per_rank
    for e in range(plan.num_experts):
        assert len({int(p) // S for p in plan.log2phy[e][: int(plan.replicas[e])]}) >= min_ranks
    for lost in range(plan.num_ranks):
        surviving_plan(plan, [lost])  # no ExpertsLostError
    # zipf, deepseek-v3 shapes with 2E slots: max/mean 1.017 (1.00007 without the spread)
    assert max_over_mean(args[0], plan) <= 1.1


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"min_ranks": 0}, "min_ranks=0"), ({"min_ranks": 3}, "min_ranks=3 <= 2"), ({"min_ranks": 2}, ">= min_ranks"),
])
def test_min_ranks_refuses_what_cannot_spread(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_replicas(torch.ones(8), 12, 2, **kwargs)


def test_rank_loads_split_an_expert_over_its_copies():
    plan = ReplicaPlan.from_slots([[0, 1], [0, 2]], 3)
    assert rank_loads([4.0, 1.0, 2.0], plan).tolist() == [3.0, 4.0]
    assert max_over_mean([4.0, 1.0, 2.0], plan) == pytest.approx(4 / 3.5)
    assert max_over_mean([0.0, 0.0, 0.0], plan) == 1.0


@pytest.mark.parametrize(("args", "match"), [
    ((torch.ones(8), 6, 2), "num_physical=6 >= E=8"),
    ((torch.ones(8), 9, 2), "divisible by num_ranks"),
    ((torch.ones(8), 8, 4, 3), "divisible by num_nodes"),
    ((torch.ones(8), 8, 2, 1, 3), "divisible by num_groups"),
    ((torch.tensor([1.0, -1.0]), 2, 2), ">= 0"),
    ((torch.tensor([1.0, float("nan")]), 2, 2), "finite"),
    ((torch.ones(2, 2), 4, 2), r"\[E\]"),
])
def test_plan_refuses_impossible_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        plan_replicas(*args)


# --- bench ---


def test_bench_eplb_command_writes_its_table_and_json(tmp_path, capsys):
    from epmoe.cli import main

    out = tmp_path / "eplb.json"
    assert main(["bench", "eplb", "--experts", "16", "--world", "4", "--tokens", "64", "--redundant", "0,4",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "zipf-shuffled" in text and "eplb_next" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["trace"], r["redundant"]) for r in rows] == [(t, r) for t in TRACES for r in (0, 4)]
    for r in rows:  # the plan is fitted to the window it is measured on: never worse than contiguous blocks
        assert 1.0 <= r["eplb"] <= r["contiguous"] + 1e-12
        assert r["us_contiguous"] > 0 and r["us_eplb"] > 0  # the slowest rank's experts stage, timed
    assert "us_eplb" in text
    assert "per rank: picks served in the last window of each trace (T=64)" in text
    per_rank = json.loads(out.read_text())["meta"]["per_rank"]  # a row per rank, then max/mean
    assert [r["rank"] for r in per_rank] == [0, 1, 2, 3, "max/mean"]
    for t in TRACES:  # every pick is served once, before and after: 64 tokens x top-8
        assert sum(r[f"{t} before"] for r in per_rank[:4]) == pytest.approx(64 * 8)
        assert sum(r[f"{t} after"] for r in per_rank[:4]) == pytest.approx(64 * 8)
        assert 1.0 <= per_rank[-1][f"{t} after"] <= per_rank[-1][f"{t} before"] + 1e-12


def test_bench_eplb_refuses_slots_that_do_not_divide_over_ranks(capsys):
    from epmoe.cli import main

    assert main(["bench", "eplb", "--experts", "16", "--world", "4", "--tokens", "8", "--redundant", "3"]) == 2
    assert "divisible by num_ranks" in capsys.readouterr().err
