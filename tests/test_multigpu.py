"""Multi-GPU: one NCCL process per GPU (epmoe.launch.run_ranks(..., backend="nccl")), W = 2, 4
and 8 where that many GPUs exist; skipped otherwise.

The checks are those of the CPU tests, run on real ranks over NVLink: every dp backend and
payload against the single-rank reference (tests/test_comm.py cases for allgather/nccl_a2a in
fp32, tests/test_symm_a2a.py cases for symm_a2a in bf16, both including zero-token ranks),
symm_a2a dispatch -> combine captured in a CUDA graph and replayed with new routing and token
counts, and a peer that never arrives giving SymmTimeoutError in the dispatch and the combine
phase.

NVLink multicast stays off: the variables below are set in this process before any rank is
spawned (workers inherit the environment), and every rank reports them back.

    pytest -m multigpu tests/test_multigpu.py
"""

from __future__ import annotations

import os

import pytest
import torch

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(MULTICAST_OFF)

from epmoe.group import Placement  # noqa: E402
from epmoe.launch import run_ranks  # noqa: E402
from epmoe.routing import Routing  # noqa: E402
from tests import test_comm, test_symm_a2a  # noqa: E402

WORLDS = [pytest.param(w, marks=pytest.mark.skipif(torch.cuda.device_count() < w, reason=f"needs {w} GPUs"))
          for w in (2, 4, 8)]
TIMEOUT = 1200  # seconds per launch: first calls compile the Triton kernels in every process


def _env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in MULTICAST_OFF}


def _rank_references(group) -> dict:
    """Every dp backend and payload on this rank's GPU against the single-rank reference."""
    wire = [test_comm._run_case(group, c, n, device="cuda") for c in test_comm.CASES for n in test_comm.BACKENDS]
    symm = test_symm_a2a._rank_cases(group, test_symm_a2a.PAYLOADS, test_symm_a2a.CASES, device="cuda",
                                     dtype=torch.bfloat16)
    return {"env": _env(), "wire": wire, "symm": symm}


@pytest.mark.multigpu
@pytest.mark.parametrize("world", WORLDS)
def test_every_backend_and_payload_matches_reference(world):
    for rank, r in enumerate(run_ranks(_rank_references, world, timeout=TIMEOUT, backend="nccl")):
        assert r["env"] == MULTICAST_OFF, f"rank {rank} runs with NVLink multicast settings {r['env']}"
        test_comm._check_cases(r["wire"], world)
        assert not r["symm"], f"rank {rank}: {r['symm']}"


def _rank_graph_replay(group) -> list[str]:
    """symm_a2a dispatch -> synthetic experts -> combine captured per token-count bucket, then
    replayed with new routing (random, one rank, masked) and token counts (zero-token ranks)."""
    from tests.test_symm_a2a import CFG, TM, Case, inputs, make_symm, synthetic_experts, synthetic_reference

    W, rank = group.world, group.rank
    placement = Placement.contiguous(CFG.num_experts, W)
    b = make_symm(CFG, group, placement, max_tokens_per_rank=TM, impl="triton", device="cuda", dtype=torch.bfloat16,
                  check_errors=False)
    buckets = [(TM, 0, 3, 1, 5, 2, 0, 7)[:W], (1,) * W]
    graphs = []
    for tokens in buckets:
        T = tokens[rank]
        x = torch.zeros(T, CFG.hidden, device="cuda", dtype=torch.bfloat16)
        ids = torch.arange(CFG.top_k, dtype=torch.int32, device="cuda").expand(T, -1).contiguous()
        w = torch.zeros(T, CFG.top_k, device="cuda")
        y = torch.zeros(T, CFG.hidden, device="cuda", dtype=torch.bfloat16)
        routing = Routing(ids, w)

        def step(x=x, routing=routing, y=y) -> None:
            d = b.dispatch(x, routing)
            b.combine(synthetic_experts(d, torch.bfloat16), d, out=y)

        step()  # warm-up on every rank at once (compiles, allocates)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        graphs.append((g, tokens, x, ids, w, y))
    errors = []
    for it in range(6):
        g, tokens, x, ids, w, y = graphs[it % 2]
        case = Case(f"graph{it}", tokens + (0,) * (8 - W), routing=("random", "one_rank", "masked")[it % 3])
        xr, ir, wr = inputs(case, rank, W)
        x.copy_(xr)
        ids.copy_(ir)
        w.copy_(wr)
        group.barrier()
        g.replay()
        torch.cuda.synchronize()
        b.check()
        want = synthetic_reference(xr.to(torch.bfloat16).float(), ir, wr, placement).to(torch.bfloat16)
        if not torch.equal(y.cpu(), want):
            errors.append(f"replay {it} (tokens {tokens}, {case.routing}): output differs")
    if int(b._state[0]) != 2 + 6:
        errors.append(f"device sequence number {int(b._state[0])}, want 8 (two warm-ups, six replays)")
    group.barrier()
    return errors


@pytest.mark.multigpu
@pytest.mark.parametrize("world", WORLDS)
def test_symm_cuda_graph_replay_with_new_routing_and_token_counts(world):
    for rank, errors in enumerate(run_ranks(_rank_graph_replay, world, timeout=TIMEOUT, backend="nccl")):
        assert not errors, f"rank {rank}: {errors}"


def _rank_silent(group, phase: str, silent: tuple[int, ...]) -> tuple[dict, str]:
    return _env(), test_symm_a2a._rank_silent(group, phase, silent, device="cuda")


@pytest.mark.multigpu
@pytest.mark.parametrize(("world", "phase", "silent"), [
    (2, "dispatch", (1,)), (2, "combine", (1,)),
    pytest.param(4, "dispatch", (0, 2), marks=pytest.mark.skipif(torch.cuda.device_count() < 4, reason="4 GPUs")),
    pytest.param(4, "combine", (3,), marks=pytest.mark.skipif(torch.cuda.device_count() < 4, reason="4 GPUs")),
])
def test_symm_peer_that_never_arrives_times_out(world, phase, silent):
    results = run_ranks(_rank_silent, world, args=(phase, silent), timeout=TIMEOUT, backend="nccl")
    assert all(env == MULTICAST_OFF for env, _ in results)
    test_symm_a2a.check_silent([msg for _, msg in results], phase, silent)


def _rank_layer_graphs(group, comm: str) -> list[str]:
    """The whole layer captured with capture_graphs on this rank's GPU: comm="auto" (symm_a2a
    and the static-shape NCCL backends as candidates) or one backend; ranks call with different
    token counts (one with none), and every replay equals the same layer's eager forward."""
    from epmoe import ExpertWeights, MoEConfig, MoELayer

    cfg = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=256, intermediate=128, num_experts=16)
    dev = torch.device("cuda", torch.cuda.current_device())
    weights = ExpertWeights.random(cfg, cfg.num_experts, dtype=torch.bfloat16, device=dev,
                                   generator=torch.Generator().manual_seed(0))
    opts = {"max_tokens_per_rank": 64, "static_shapes": True} if comm != "symm_a2a" else {"max_tokens_per_rank": 64}
    graphed = MoELayer.from_global(cfg, weights, group, comm=comm, runner="triton", comm_options=dict(opts))
    eager = MoELayer.from_global(cfg, weights, group, comm=comm, runner="triton", comm_options=dict(opts))
    graphed.capture_graphs(64, buckets=[4, 16, 64])
    errors = []
    g = torch.Generator().manual_seed(10 + group.rank)
    for step, base in enumerate([3, 64, 1, 16, 40]):
        T = 0 if group.rank == step % group.world else max(1, base - group.rank)
        x = torch.randn(T, cfg.hidden, generator=g).to(dev, torch.bfloat16)
        logits = torch.randn(T, cfg.num_experts, generator=g).to(dev)
        y = graphed(x, logits)
        want = eager(x, logits)
        if not torch.equal(y, want):
            errors.append(f"step {step} T={T} comm={graphed.combo.comm}: max diff "
                          f"{(y.float() - want.float()).abs().max().item() if T else 0}")
    return errors


@pytest.mark.multigpu
@pytest.mark.parametrize("comm", ["auto", "symm_a2a", "nccl_a2a", "allgather"])
@pytest.mark.parametrize("world", WORLDS[:2])
def test_layer_graphs_over_real_ranks(world, comm):
    for rank, errors in enumerate(run_ranks(_rank_layer_graphs, world, args=(comm,), timeout=TIMEOUT,
                                            backend="nccl")):
        assert not errors, f"rank {rank}: {errors}"


def _rank_replay_bad_input(group, comm: str) -> list[str]:
    """Captured layers; one rank passes NaN logits at a replay, then x of another dtype (forward's
    shape check fails while its peers replay): every rank must raise (the peers PeerFailedError
    naming it), then a good call replays on every rank and equals the eager layer."""
    from epmoe import ExpertWeights, MoEConfig, MoELayer
    from epmoe.group import PeerFailedError

    cfg = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=256, intermediate=128, num_experts=16)
    dev = torch.device("cuda", torch.cuda.current_device())
    weights = ExpertWeights.random(cfg, cfg.num_experts, dtype=torch.bfloat16, device=dev,
                                   generator=torch.Generator().manual_seed(0))
    opts = {"max_tokens_per_rank": 16, "static_shapes": True} if comm != "symm_a2a" else {"max_tokens_per_rank": 16}
    graphed = MoELayer.from_global(cfg, weights, group, comm=comm, runner="triton", comm_options=dict(opts))
    eager = MoELayer.from_global(cfg, weights, group, comm=comm, runner="triton", comm_options=dict(opts))
    graphed.capture_graphs(16, buckets=[4, 16])
    g = torch.Generator().manual_seed(10 + group.rank)
    errors, bad = [], group.rank == group.world - 1
    for kind in ("nan", "float64"):
        x = torch.randn(5, cfg.hidden, generator=g).to(dev, torch.bfloat16)
        logits = torch.randn(5, cfg.num_experts, generator=g).to(dev)
        if bad and kind == "nan":
            logits[2, 3] = float("nan")
        if bad and kind == "float64":
            x = x.double()
        try:
            graphed(x, logits)
            errors.append(f"{kind}: went ahead")
        except PeerFailedError as exc:
            if bad or f"rank {group.world - 1} failed its own checks" not in str(exc):
                errors.append(f"{kind}: {exc}")
        except ValueError as exc:
            if not bad:
                errors.append(f"{kind}: {exc}")
        x = torch.randn(7, cfg.hidden, generator=g).to(dev, torch.bfloat16)
        logits = torch.randn(7, cfg.num_experts, generator=g).to(dev)
        if not torch.equal(graphed(x, logits), eager(x, logits)):
            errors.append(f"{kind}: the good call after it differs from eager")
    return errors


@pytest.mark.multigpu
@pytest.mark.parametrize("comm", ["auto", "symm_a2a", "nccl_a2a"])
@pytest.mark.parametrize("world", WORLDS[:1])
def test_bad_input_at_replay_raises_on_every_rank(world, comm):
    for rank, errors in enumerate(run_ranks(_rank_replay_bad_input, world, args=(comm,), timeout=TIMEOUT,
                                            backend="nccl")):
        assert not errors, f"rank {rank}: {errors}"
