"""symm_a2a's split phases: the start is the send phase (it waits for no peer), the wait the
receive phase. (start + wait against the blocking calls on gloo and virtual ranks, every payload
of tests/test_split_phase.py, runs there; forward_microbatches too.)

CPU: a peer 2 s late: an eager dispatch start agrees with it first (taking the delay), a combine
start returns at once and its wait takes the delay; the Triton
kernels through the interpreter give the same bits split (other work between the halves) as the
phase calls in turn. GPU (skipped here): a one-rank layer with the shared experts beside the
halves is captured in a CUDA graph and its replays equal eager calls; virtual ranks on one GPU
with a matmul between every start and wait equal the blocking calls.
"""

from __future__ import annotations

import time

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Placement, VirtualGroup
from epmoe.layer import SharedExperts
from epmoe.routing import Routing
from tests.dist import run_ranks
from tests.test_symm_a2a import (
    CASES,
    CFG,
    _compile_once,
    _virtual_backends,
    inputs,
    interpreted,
    make_symm,
    split_phase_call,
    synthetic_experts,
)


def late_peer_rank(group) -> dict:
    """Rank 1 arrives 2 s late to a dispatch and to a combine. An eager dispatch start agrees with
    its peers before it writes a flag (a failing rank makes every rank raise), so rank 0's takes
    the delay and its wait does not; a combine start waits for no peer: rank 0's returns at once
    and its wait takes the delay."""
    b = make_symm(CFG, group, Placement.contiguous(CFG.num_experts, group.world), max_tokens_per_rank=8)
    x, ids, w = inputs(CASES[0], group.rank, group.world)
    times = {}
    if group.rank == 1:
        time.sleep(2.0)
    t0 = time.monotonic()
    pending = b.dispatch_start(x, Routing(ids, w))
    t1 = time.monotonic()
    d = pending.wait()
    times["dispatch"] = (t1 - t0, time.monotonic() - t1)
    out = synthetic_experts(d, torch.float32)
    if group.rank == 1:
        time.sleep(2.0)
    t0 = time.monotonic()
    pending = b.combine_start(out, d)
    t1 = time.monotonic()
    pending.wait()
    times["combine"] = (t1 - t0, time.monotonic() - t1)
    return times


def test_symm_combine_start_returns_before_a_late_peer_arrives():
    times = run_ranks(late_peer_rank, 2)[0]
    start, wait = times["dispatch"]
    assert start > 1.0 and wait < 1.0, f"dispatch: start took {start:.2f}s, wait {wait:.2f}s"
    start, wait = times["combine"]
    assert start < 1.0 and wait > 1.0, f"combine: start took {start:.2f}s, wait {wait:.2f}s"


def _split_call(bs, xs, routings, between) -> list[torch.Tensor]:
    """One call on virtual ranks from one thread through the halves, `between()` after each start."""
    ps = [b.dispatch_start(x, r) for b, x, r in zip(bs, xs, routings)]
    between()
    ds = [p.wait() for p in ps]
    qs = [b.combine_start(synthetic_experts(d, torch.float32), d) for b, d in zip(bs, ds)]
    between()
    return [q.wait() for q in qs]


@interpreted
@pytest.mark.parametrize("payload", ["bf16", "fp8"])
def test_triton_halves_interpreted_equal_the_phase_calls(payload):
    bs = _virtual_backends(2, impl="triton", device="cpu", dtype=torch.float32, payload=payload)
    work: list[torch.Tensor] = []
    for case in (CASES[0], CASES[5], CASES[1]):  # uneven with an empty rank, all empty, one token each
        ev = [inputs(case, r, 2) for r in range(2)]
        xs, rs = [x for x, _, _ in ev], [Routing(i, w) for _, i, w in ev]
        want = split_phase_call(bs, xs, rs, lambda r, d: synthetic_experts(d, torch.float32))
        got = _split_call(bs, xs, rs, lambda: work.append(torch.randn(64, 64) @ torch.randn(64, 64)))
        assert all(torch.equal(g, w) for g, w in zip(got, want)), case.name
    for b in bs:
        b.check()


@pytest.mark.gpu
def test_gpu_one_rank_symm_layer_with_shared_beside_the_halves_captures():
    """symm_a2a at world 1 with shared_stream on: eager equals off bit for bit; CUDA-graph
    replays (halves, side stream fork and join captured) equal eager calls."""
    cfg = MoEConfig.from_preset("deepseek-v3").scaled(hidden=256, intermediate=128, num_experts=16)
    g = torch.Generator().manual_seed(5)
    weights = ExpertWeights.random(cfg, cfg.num_experts, dtype=torch.bfloat16, device="cuda", generator=g)
    bias = torch.randn(cfg.num_experts, generator=g).cuda() * 0.1
    shared = SharedExperts.random(cfg, torch.bfloat16, "cuda", g)
    layers = {flag: MoELayer(cfg, weights, comm="symm_a2a", runner="triton", correction_bias=bias, shared=shared,
                             shared_stream=flag, comm_options={"max_tokens_per_rank": 64}) for flag in (True, False)}
    xs = {T: (torch.randn(T, cfg.hidden, generator=g).to("cuda", torch.bfloat16),
              torch.randn(T, cfg.num_experts, generator=g).cuda()) for T in (1, 7, 64)}
    eager = {T: layers[True](*xs[T]) for T in xs}
    for T in xs:
        torch.testing.assert_close(eager[T], layers[False](*xs[T]), atol=0, rtol=0, msg=f"T={T}")
    layers[True].capture_graphs(64, buckets=[8, 64])
    for T in (7, 64, 1, 64):
        torch.testing.assert_close(layers[True](*xs[T]), eager[T], atol=0, rtol=0, msg=f"graph T={T}")


@pytest.mark.gpu
def test_gpu_virtual_ranks_halves_with_work_between_equal_the_blocking_calls():
    """W = 2 virtual ranks on one GPU (threads): a matmul between every start and its wait; the
    results equal the blocking calls bit for bit."""
    placement = Placement.contiguous(CFG.num_experts, 2)
    _compile_once(2, "cuda", torch.bfloat16)  # every kernel variant compiled from one thread first

    def rank(group) -> bool:
        b = make_symm(CFG, group, placement, "cuda", max_tokens_per_rank=8, timeout_s=30.0)
        same = []
        for case in (CASES[0], CASES[2], CASES[5]):
            x, ids, w = inputs(case, group.rank, 2)
            r = Routing(ids.cuda(), w.cuda())
            x = x.to("cuda", torch.bfloat16)
            d = b.dispatch(x, r)
            want = b.combine(synthetic_experts(d, torch.bfloat16), d)
            p = b.dispatch_start(x, r)
            a = torch.randn(256, 256, device="cuda")
            a = a @ a
            d = p.wait()
            q = b.combine_start(synthetic_experts(d, torch.bfloat16), d)
            a = a @ a
            same.append(torch.equal(q.wait(), want))
        return all(same)

    assert all(VirtualGroup(2, timeout=120).run(rank))
