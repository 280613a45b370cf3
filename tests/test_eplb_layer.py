"""Replicas inside the layer (epmoe/eplb.py with layer.py): the logical -> physical map, layers
with replica plans against the same layer without copies on every backend (gloo and virtual
ranks, logits and routed modes, reference and Triton runners), in-place rebalancing, the
checkpoint loading each slot, and the rebuild over the ranks that survive a lost one."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist

from epmoe import EPGroup, ExpertWeights, MoEConfig, MoELayer, Routing, VirtualGroup
from epmoe.checkpoint import load_moe_layer
from epmoe.comm import COMM_BACKENDS
from epmoe.eplb import (
    ExpertLoad,
    ExpertsLostError,
    ReplicaMap,
    ReplicaPlan,
    align_plan,
    plan_moves,
    plan_replicas,
    surviving_plan,
)
from epmoe.experts.triton import TritonRunner
from epmoe.group import VirtualGroupError
from epmoe.quant import quantize_weights
from epmoe.select import Combo, check
from tests.dist import run_ranks

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=24, top_k=4)
TOL = {torch.float32: 1e-5, torch.float16: 4e-3}  # fp32: only the summation order differs; fp16: rounding
TOKENS = (7, 0, 5, 3)  # per rank: one rank with none


def popularity(seed: int) -> torch.Tensor:
    """[E] Zipf popularity (1 / rank) over a random order of the experts."""
    order = torch.randperm(CFG.num_experts, generator=torch.Generator().manual_seed(seed))
    return (1.0 / torch.arange(1, CFG.num_experts + 1, dtype=torch.float64))[order]


def skewed_plan(world: int, seed: int = 0, redundant: int = 12) -> ReplicaPlan:
    return plan_replicas(popularity(seed), CFG.num_experts + redundant, world)


def two_rank_cover(num_experts: int, world: int) -> ReplicaPlan:
    """Every expert on two ranks: rank r holds the contiguous blocks r and r + 1 (mod W)."""
    per = num_experts // world
    block = lambda b: list(range(b * per, (b + 1) * per))  # noqa: E731
    return ReplicaPlan.from_slots([block(r) + block((r + 1) % world) for r in range(world)], num_experts)


def full_weights(dtype: torch.dtype = torch.float32) -> ExpertWeights:
    w = ExpertWeights.random(CFG, CFG.num_experts, generator=torch.Generator().manual_seed(0))
    return ExpertWeights(w.w13.to(dtype), w.w2.to(dtype))


def rank_inputs(rank: int, layout: str, world: int) -> tuple[torch.Tensor, torch.Tensor, Routing]:
    """x [T, H], logits [T, E] favouring the popular experts, a routing drawn from the popularity;
    tp: every rank holds every rank's tokens."""
    if layout == "tp":
        parts = [rank_inputs(r, "dp", world) for r in range(world)]
        ids = torch.cat([p[2].ids for p in parts])
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                Routing(ids, torch.cat([p[2].weights for p in parts])))
    g = torch.Generator().manual_seed(zlib.crc32(f"replica/{rank}".encode()))
    T, E, K = TOKENS[rank], CFG.num_experts, CFG.top_k
    pop = popularity(0).float()
    x = torch.randn(T, CFG.hidden, generator=g)
    logits = torch.randn(T, E, generator=g) + 3 * pop.log()
    ids = torch.multinomial(pop.expand(T, E), K, generator=g).int() if T else torch.zeros(0, K, dtype=torch.int32)
    return x, logits, Routing(ids, torch.rand(T, K, generator=g) + 0.1)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not ref.numel():
        return 0.0
    return (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)


# ---- the map ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dp", "tp"])
def test_map_sends_every_pick_to_a_copy_of_its_expert(layout):
    plan, world = skewed_plan(4), 4
    T = 64
    ids = torch.multinomial(popularity(0).float().expand(T, -1), CFG.top_k,
                            generator=torch.Generator().manual_seed(1)).int()
    ids[-3:] = -1  # padding rows stay padding
    per_rank = [ReplicaMap(plan, r, layout, "cpu")(ids) for r in range(world)]
    for rank, slots in enumerate(per_rank):
        assert slots.dtype == torch.int32 and slots.shape == ids.shape
        assert bool((slots[-3:] == -1).all())
        live = slots[:-3].long()
        assert torch.equal(plan.phy2log[live], ids[:-3])  # a slot of the picked expert
        assert torch.equal(slots, ReplicaMap(plan, rank, layout, "cpu")(ids))  # deterministic
    if layout == "tp":  # every rank holds the same tokens: every rank picks the same copies
        assert all(torch.equal(per_rank[0], s) for s in per_rank)
    hot = int(plan.replicas.argmax())  # every token picks it: its picks spread evenly over its copies
    n, all_hot = int(plan.replicas[hot]), torch.full((T, 1), hot, dtype=torch.int32)
    slots = torch.cat([ReplicaMap(plan, r, layout, "cpu")(all_hot) for r in range(1 if layout == "tp" else world)])
    per_copy = torch.bincount(slots.flatten().long(), minlength=plan.num_physical)[plan.log2phy[hot, :n].long()]
    assert n > 1 and int(per_copy.max() - per_copy.min()) <= 1, per_copy.tolist()


def test_map_tables_are_rewritten_in_place():
    a, b = skewed_plan(4, 0), skewed_plan(4, 1)
    m = ReplicaMap(a, 1, "dp", "cpu")
    ptrs = [t.data_ptr() for t in (m.slots, m.first, m.copies)]
    m.load(b)
    assert ptrs == [t.data_ptr() for t in (m.slots, m.first, m.copies)]
    ids = torch.arange(CFG.num_experts, dtype=torch.int32).view(-1, 4)
    assert torch.equal(m(ids), ReplicaMap(b, 1, "dp", "cpu")(ids))
    with pytest.raises(ValueError, match="cannot replace"):
        m.load(skewed_plan(2))


# ---- layers with replicas against the same layer without ----------------------------------------


def comm_combos(world: int) -> list[tuple[str, str]]:
    """(comm, layout) of every registered backend the table allows on the CPU at `world`, and auto."""
    out = []
    for name in sorted(COMM_BACKENDS):
        for layout in COMM_BACKENDS[name].layouts:
            if check(Combo(comm=name, runner="reference", layout=layout, world=world, device="cpu"))[0]:
                out.append((name, layout))
    return out + [("auto", "dp")] if world > 1 else out


def replica_rank(group, world: int, combos: list[tuple[str, str]], runner: str = "reference",
                 dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Per (comm, layout, mode): max rel err of the replica layer against the same layer without
    copies and against the one-rank reference, before and after a rebalance. runner "triton":
    swapped in for the reference runner the CPU table allows (it runs interpreted)."""
    rank = group.rank if group is not None else 0
    full, plan, out = full_weights(dtype), skewed_plan(world), {}
    reference = MoELayer(CFG, full_weights(), runner="reference")
    for comm, layout in combos:
        kw = {"comm": comm, "layout": layout, "runner": "reference"}
        load = ExpertLoad(CFG.num_experts)
        layer = MoELayer.from_global(CFG, full, group, replicas=plan, load=load, **kw)
        plain = MoELayer.from_global(CFG, full, group, **kw)
        if runner == "triton":
            for lay in (layer, plain):
                lay.runner = TritonRunner(CFG, TritonRunner.prepare(lay.runner.weights, CFG))
        x, logits, routing = rank_inputs(rank, layout, world)
        x = x.to(dtype)
        for when in ("", "/rebalanced"):
            for mode, args in (("logits", {"router_logits": logits}), ("routed", {"routing": routing})):
                y = layer(x, **args)
                out[f"{comm}/{layout}/{mode}{when}"] = rel_err(y, plain(x, **args))
                out[f"{comm}/{layout}/{mode}{when}/ref"] = rel_err(y, reference(x.float(), **args))
                assert y.dtype == dtype and y.shape == x.shape
            layer.rebalance(skewed_plan(world, seed=5))
        assert int(load.counts().sum()) == 4 * x.shape[0] * CFG.top_k  # logical picks of the 4 calls
    return out


def check_results(results: list[dict[str, float]], tol: float) -> None:
    for rank, r in enumerate(results):
        for key, err in r.items():
            assert err <= tol, f"rank {rank} {key}: rel err {err:.3g} > {tol}"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_replica_layer_matches_the_plain_layer_on_gloo_ranks(world):
    combos = comm_combos(world)
    assert {"allgather", "nccl_a2a", "symm_a2a", "auto"} <= {c for c, _ in combos}
    check_results(run_ranks(replica_rank, world, args=(world, combos), timeout=300), TOL[torch.float32])


def test_replica_layer_on_one_rank_and_virtual_ranks():
    check_results([replica_rank(None, 1, comm_combos(1))], TOL[torch.float32])
    combos = comm_combos(4)
    check_results(VirtualGroup(4).run(lambda g: replica_rank(g, 4, combos)), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replica_layer_with_the_triton_runner(dtype):
    """The Triton runner (interpreted on the CPU) over replica slots, on one rank and on two gloo
    ranks (not virtual ones: the interpreter's launch state is not thread-safe)."""
    check_results([replica_rank(None, 1, [("none", "dp")], "triton", dtype)], TOL[dtype])
    combos = [("nccl_a2a", "dp"), ("none", "tp")]
    check_results(run_ranks(triton_rank, 2, args=(2, combos, dtype), timeout=300), TOL[dtype])


def triton_rank(group, world: int, combos: list[tuple[str, str]], dtype: torch.dtype) -> dict[str, float]:
    """replica_rank with the Triton runner in a gloo process (interpreted, as conftest.py sets it up)."""
    from tests.conftest import _fix_interpreter_scalar_index

    _fix_interpreter_scalar_index()
    return replica_rank(group, world, combos, "triton", dtype)


def test_replicas_refuse_what_does_not_fit():
    full = full_weights()
    with pytest.raises(ValueError, match="placement or replicas"):
        MoELayer(CFG, full, placement=ReplicaPlan.contiguous(24, 1).placement(), replicas=ReplicaPlan.contiguous(24, 1))
    with pytest.raises(ValueError, match="24 experts on 2 ranks"):
        MoELayer(CFG, full, replicas=ReplicaPlan.contiguous(24, 2))
    with pytest.raises(ValueError, match="shape"):  # 24 experts given, the plan has 36 slots
        MoELayer(CFG, full, replicas=skewed_plan(1))
    with pytest.raises(ValueError, match="no replica plan"):
        MoELayer(CFG, full).rebalance(skewed_plan(1))
    layer = MoELayer.from_global(CFG, full, replicas=skewed_plan(1))
    with pytest.raises(ValueError, match="keeps E, P and W"):
        layer.rebalance(ReplicaPlan.contiguous(24, 1))
    assert "36 slots, 36 on this rank" in repr(layer)


# ---- rebalancing ------------------------------------------------------------------------------------


def test_align_keeps_what_a_rank_keeps():
    old = ReplicaPlan.from_slots([[0, 1, 2, 3], [4, 5, 6, 0]], 7)
    new = ReplicaPlan.from_slots([[0, 0, 1, 2], [3, 4, 5, 6]], 7)  # 0 doubled on rank 0, 3 to rank 1
    aligned = align_plan(new, old)
    assert aligned.phy2log.tolist() == [0, 1, 2, 0, 4, 5, 6, 3]
    moves = plan_moves(old, aligned)  # (dst, src, expert): 0 from rank 0's own slot, 3 from rank 0
    assert [(m.dst, m.src, m.expert) for m in moves] == [(3, 0, 0), (7, 3, 3)]
    assert int((new.phy2log != old.phy2log).sum()) == 7  # slot by slot, the plan as asked would move 7


def _slot_bytes_equal(weights: ExpertWeights, full: ExpertWeights, experts: torch.Tensor) -> bool:
    """Whether every slot's tensors are byte-equal to those of its expert in `full`."""
    for name in ("w13", "w2"):
        got, want = getattr(weights, name), getattr(full, name)
        fields = [f for f in ("data", "scales", "global_scale") if getattr(got, f, None) is not None]
        pairs = [(got, want)] if isinstance(got, torch.Tensor) else [(getattr(got, f), getattr(want, f))
                                                                     for f in fields]
        for g, w in pairs:
            if not torch.equal(g.view(torch.uint8), w[experts].view(torch.uint8)):
                return False
    return True


def rebalance_rank(group, world: int, comm: str, fmt: str = "bf16") -> dict:
    rank = group.rank if group is not None else 0
    full = full_weights()
    if fmt != "bf16":
        full = ExpertWeights(quantize_weights(full.w13, fmt), quantize_weights(full.w2, fmt))
    old, new = skewed_plan(world, 0), skewed_plan(world, 3)
    layer = MoELayer.from_global(CFG, full, group, comm=comm, replicas=old)
    x, logits, _ = rank_inputs(rank, "dp", world)
    before = layer(x, logits)
    weights = layer.runner.weights
    ptrs = [weights.w13.data_ptr() if fmt == "bf16" else weights.w13.data.data_ptr()]
    done = layer.rebalance(new)
    after = layer(x, logits)
    again = layer.rebalance(new)  # the plan already there: nothing moves
    return {"err": rel_err(after, before), "moved": done.moved, "changed": done.changed, "received": done.received,
            "sent": done.sent, "again": again.moved, "plan": done.plan.phy2log.tolist(),
            "same_ptr": ptrs == [weights.w13.data_ptr() if fmt == "bf16" else weights.w13.data.data_ptr()],
            "slots_hold_their_experts": _slot_bytes_equal(weights, full, layer.replicas.rank_experts(rank))}


def check_rebalance(results: list[dict], world: int) -> None:
    old, new = skewed_plan(world, 0), skewed_plan(world, 3)
    aligned = align_plan(new, old)
    changed = (aligned.phy2log != old.phy2log).view(world, -1).sum(1).tolist()
    assert sum(changed) < int((new.phy2log != old.phy2log).sum())  # aligning saves moves
    for rank, r in enumerate(results):
        assert r["plan"] == aligned.phy2log.tolist()
        assert sorted(r["plan"][rank * old.slots_per_rank:(rank + 1) * old.slots_per_rank]) == \
            new.rank_experts(rank).tolist()  # each rank holds what the new plan asks
        assert (r["moved"], r["changed"]) == (sum(changed), changed[rank]), f"rank {rank}"
        assert r["received"] <= r["changed"] and r["again"] == 0
        assert r["same_ptr"] and r["slots_hold_their_experts"], f"rank {rank}"
        assert r["err"] <= TOL[torch.float32], f"rank {rank}: outputs differ after the rebalance: {r['err']:.3g}"
    assert sum(r["received"] for r in results) == sum(r["sent"] for r in results) > 0


@pytest.mark.parametrize(("world", "comm"), [(2, "nccl_a2a"), (4, "allgather")])
def test_rebalance_moves_only_changed_slots_on_gloo_ranks(world, comm):
    check_rebalance(run_ranks(rebalance_rank, world, args=(world, comm), timeout=300), world)


@pytest.mark.parametrize("fmt", ["fp8", "fp8_block", "nvfp4"])
def test_rebalance_moves_quantized_weights(fmt):
    check_rebalance(VirtualGroup(3).run(lambda g: rebalance_rank(g, 3, "symm_a2a", fmt)), 3)


def test_rebalance_with_other_plans_on_some_rank_raises_everywhere():
    def body(g):
        layer = MoELayer.from_global(CFG, full_weights(), g, comm="nccl_a2a", replicas=skewed_plan(2))
        layer.rebalance(skewed_plan(2, seed=g.rank))  # rank 1 asks for another plan

    with pytest.raises(Exception, match="differ from rank 0 on new plan"):
        VirtualGroup(2).run(body)


# ---- checkpoint ---------------------------------------------------------------------------------


def test_checkpoint_loads_each_slot_with_its_expert(tmp_path):
    from tests.test_checkpoint import DS, LAYER, build

    b = build(tmp_path / "ckpt", cfg=DS)
    plan = ReplicaPlan.from_slots([[0, 1, 2, 3, 0], [4, 5, 6, 7, 0]], 8)
    for rank in range(2):
        ck = load_moe_layer(b.path, DS, LAYER, rank=rank, world=2, replicas=plan, runner="reference")
        want = plan.rank_experts(rank)
        assert torch.equal(ck.expert_ids, want)
        assert torch.equal(ck.experts.w13, b.full.w13.to(torch.bfloat16)[want])
    with pytest.raises(ValueError, match="does not fit"):
        load_moe_layer(b.path, DS, LAYER, rank=0, world=4, replicas=plan)


# ---- a lost rank ------------------------------------------------------------------------------------


def test_surviving_plan_keeps_the_survivors_slots_or_names_the_experts_gone():
    plan = two_rank_cover(24, 3)
    left = surviving_plan(plan, [1])
    assert left.num_ranks == 2 and left.phy2log.tolist() == plan.rank_experts(0).tolist() + plan.rank_experts(
        2).tolist()
    with pytest.raises(ExpertsLostError, match=r"experts \[8, 9, 10, 11, 12, 13, 14, 15\]") as info:
        surviving_plan(ReplicaPlan.contiguous(24, 3), [1])
    assert info.value.experts == list(range(8, 16)) and info.value.ranks == [1]
    with pytest.raises(ValueError, match="some but not all"):
        surviving_plan(plan, [0, 1, 2])


def survivor_rank(group, lost: list[int], cover: bool) -> dict:
    """Build over W ranks, lose `lost`: the survivors rebuild over a group of their own, serve,
    then rebalance for the new world. The lost ranks leave at once."""
    world, rank = group.world, group.rank
    plan = plan_replicas(popularity(0), 48, world, min_ranks=2) if cover else ReplicaPlan.contiguous(24, world)
    layer = MoELayer.from_global(CFG, full_weights(), group, comm="nccl_a2a", replicas=plan)
    if rank in lost:
        return {}
    survivors = [r for r in range(world) if r not in lost]
    sub = EPGroup(dist.new_group(survivors, use_local_synchronization=True), timeout=30)
    try:
        rebuilt = layer.without_ranks(lost, sub)
    except ExpertsLostError as exc:
        return {"lost_experts": exc.experts}
    x, logits, _ = rank_inputs(rank, "dp", world)
    reference = MoELayer(CFG, full_weights(), runner="reference")
    y = rebuilt(x, logits)
    load = torch.ones(24)
    rebuilt.rebalance(plan_replicas(load, rebuilt.replicas.num_physical, len(survivors)))
    return {"err": rel_err(y, reference(x, logits)), "after": rel_err(rebuilt(x, logits), reference(x, logits)),
            "world": rebuilt.world}


# Each scenario gets a pool of gloo processes of its own (pools are keyed by the collective bound):
# in processes where ranks [0, 1] once made a group without rank 2, a later
# dist.new_group([0, 2], use_local_synchronization=True) hung in gloo's connect (torch 2.13).
def test_survivors_of_a_lost_rank_keep_serving_on_gloo_ranks():
    results = run_ranks(survivor_rank, 3, args=([2], True), timeout=300, collective_timeout=31)
    assert results[2] == {}
    for rank, r in enumerate(results[:2]):
        assert r["world"] == 2 and r["err"] <= TOL[torch.float32] and r["after"] <= TOL[torch.float32], rank


def test_survivors_without_full_cover_name_the_experts_gone():
    results = run_ranks(survivor_rank, 3, args=([1], False), timeout=300, collective_timeout=29)
    assert results[0] == results[2] == {"lost_experts": list(range(8, 16))}


def test_survivors_on_virtual_ranks_and_a_single_survivor():
    plan = two_rank_cover(24, 3)
    layers = VirtualGroup(3).run(lambda g: MoELayer.from_global(CFG, full_weights(), g, comm="allgather",
                                                                replicas=plan))
    reference = MoELayer(CFG, full_weights(), runner="reference")

    def serve(g):
        layer = layers[[0, 2][g.rank]].without_ranks([1], g)
        x, logits, _ = rank_inputs(g.rank, "dp", 2)
        return rel_err(layer(x, logits), reference(x, logits))

    assert max(VirtualGroup(2).run(serve)) <= TOL[torch.float32]
    two = VirtualGroup(2).run(lambda g: MoELayer.from_global(CFG, full_weights(), g, comm="allgather",
                                                             replicas=two_rank_cover(24, 2)))
    alone = two[1].without_ranks([0], None)  # one survivor: the comm backend of one rank
    x, logits, _ = rank_inputs(0, "dp", 1)
    assert alone.world == 1 and rel_err(alone(x, logits), reference(x, logits)) <= TOL[torch.float32]
    with pytest.raises(VirtualGroupError, match="old order"):
        VirtualGroup(2).run(lambda g: layers[[2, 0][g.rank]].without_ranks([1], g))


@pytest.mark.gpu
def test_replica_layer_in_cuda_graphs_follows_a_rebalance():
    """The map and the weights are rewritten in place: graphs captured before a rebalance replay
    the new plan (triton runner, bf16, one GPU)."""
    full = full_weights(torch.bfloat16)
    full = ExpertWeights(full.w13.cuda(), full.w2.cuda())
    layer = MoELayer.from_global(CFG, full, replicas=skewed_plan(1), runner="triton")
    eager = MoELayer.from_global(CFG, full, runner="triton")
    layer.capture_graphs(16)
    x, logits, _ = rank_inputs(0, "dp", 1)
    x, logits = x.cuda().bfloat16(), logits.cuda()
    assert rel_err(layer(x, logits), eager(x, logits)) <= 2e-2
    layer.rebalance(plan_replicas(torch.ones(CFG.num_experts), 36, 1))
    assert rel_err(layer(x, logits), eager(x, logits)) <= 2e-2


def hf_rank(group, family: str) -> tuple[torch.Tensor, ...]:
    """A tiny transformers model patched with replicas (every MoE layer from one plan), before and
    after each layer's rebalance, next to the unpatched model's logits."""
    import copy

    from epmoe.integrations.hf import patch_model
    from tests.test_hf import build_model, input_ids

    world, rank = (group.world, group.rank) if group is not None else (1, 0)
    model = build_model(family)
    ids = input_ids(rank)
    with torch.no_grad():
        ref = model(ids).logits
    E = MoEConfig.from_hf(model.config).num_experts
    plan = plan_replicas(torch.arange(E, 0, -1, dtype=torch.float64), E + 2 * world, world)
    patched = copy.deepcopy(model)
    names = patch_model(patched, group=group, comm="nccl_a2a" if world > 1 else "none", layout="dp", replicas=plan)
    with torch.no_grad():
        got = patched(ids).logits
    for name in names:
        patched.get_submodule(name).moe.rebalance(plan_replicas(torch.arange(1, E + 1.0), E + 2 * world, world))
    with torch.no_grad():
        after = patched(ids).logits
    return ref, got, after


@pytest.mark.parametrize("world", [1, 2])
def test_patch_model_with_replicas_matches_the_unpatched_model(world):
    """DeepSeek-V3 (grouped routing: the backends see P slots without groups), fp32."""
    pytest.importorskip("transformers")
    results = [hf_rank(None, "deepseek_v3")] if world == 1 else run_ranks(hf_rank, world, args=("deepseek_v3",),
                                                                            timeout=300)
    for rank, (ref, got, after) in enumerate(results):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5, msg=f"rank {rank}")
        torch.testing.assert_close(after, ref, atol=2e-5, rtol=2e-5, msg=f"rank {rank} after the rebalance")


def test_replica_layer_in_micro_batches():
    """forward_microbatches maps each micro-batch's picks too (the routing is mapped once, then cut)."""
    plan, combos = skewed_plan(2), ("nccl_a2a", "allgather")

    def body(g):
        errs = []
        for comm in combos:
            layer = MoELayer.from_global(CFG, full_weights(), g, comm=comm, replicas=plan)
            plain = MoELayer.from_global(CFG, full_weights(), g, comm=comm)
            x, logits, routing = rank_inputs(g.rank, "dp", 2)
            errs.append(rel_err(layer.forward_microbatches(x, logits, splits=3), plain(x, logits)))
            errs.append(rel_err(layer.forward_microbatches(x, routing=routing), plain(x, routing=routing)))
        return max(errs)

    assert max(VirtualGroup(2).run(body)) <= TOL[torch.float32]
