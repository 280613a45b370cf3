"""symm_a2a: the one-sided protocol against the single-rank reference.

CPU: gloo processes sharing one /dev/shm workspace file (W = 2, 3, 4), virtual ranks (threads),
and the Triton kernels through the interpreter. GPU: virtual ranks on one GPU (W = 2, 4, 8),
CUDA-graph capture and replay, and the bounded wait. Every check compares with an independent
computation:

* dispatch is exact: rows are filled with their source rank and token index, so each received
  row is compared bit for bit with what its sender quantized (quantize -> dequantize of the
  sender's batch), and the pair list with expert ids computed here with plain loops;
* combine is exact with "experts" that scale a row by a power of two and router weights that
  are powers of two (every sum is exact in fp32), padding pairs poisoned with NaN;
* the whole path (reference runner) matches the single-rank reference on the same dequantized
  rows within EXACT_TOL (only the summation order differs).
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Placement, VirtualGroup
from epmoe.comm.symmetric import SEQ_WRAP, SymmA2A, SymmTimeoutError
from epmoe.experts.base import as_float
from epmoe.experts.reference import reference_experts
from epmoe.routing import Routing
from tests.dist import DistError, run_ranks

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=24, top_k=3)
TM = 8  # max_tokens_per_rank
PAYLOADS = ("bf16", "fp8", "fp8_block", "nvfp4")
# fp32 end to end: per-rank partial sums then rank order vs one sum over k.
EXACT_TOL = 1e-5
# bf16 rows and weights on the GPU against the fp32 reference: inputs, weights and output each
# rounded to 8 mantissa bits (2^-9); 2% of the largest output covers them over H = 32, I = 16.
GPU_TOL = 2e-2


@dataclass(frozen=True)
class Case:
    """tokens: per rank (first W used). routing: random | skew | one_rank | masked."""

    name: str
    tokens: tuple[int, ...]
    routing: str = "random"
    wrap: bool = False  # start this case's calls just before the sequence numbers wrap


CASES = [
    Case("uneven_empty_rank", (5, 0, 3, 1, 7, 2, 0, 4)),
    Case("t1", (1,) * 8),
    Case("full", (TM,) * 8, routing="skew"),
    Case("one_rank", (6, 2, 0, 5, 1, 1, 3, 2), routing="one_rank"),
    Case("masked", (7, 4, 6, 0, 3, 3, 3, 3), routing="masked"),
    Case("all_empty", (0,) * 8),
    Case("wrap", (2, 3, 1, 0, 2, 2, 2, 2), wrap=True),
]


def _gen(case: Case, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case.name}/{rank}".encode()))


def inputs(case: Case, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] fp32 filled with (rank, token) codes; ids [T, K] int32 (-1 = masked pair);
    weights [T, K] fp32 powers of two (NaN on masked pairs)."""
    g = _gen(case, rank)
    T, E, K, H = case.tokens[rank], CFG.num_experts, CFG.top_k, CFG.hidden
    code = (rank * 16 + torch.arange(T, dtype=torch.float32) + 1).unsqueeze(1)  # [T, 1]
    pattern = (1 + torch.arange(H) % 3).float() * torch.where(torch.arange(H) % 2 == 0, 1.0, -1.0)  # [H]
    x = code * pattern
    if case.routing == "one_rank":
        per = E // world
        ids = torch.rand(T, per, generator=g).argsort(dim=1)[:, :K] + per * (world - 1)
    elif case.routing == "skew":  # most picks on rank 0's experts
        pop = torch.where(torch.arange(E) < E // world, 20.0, 1.0)
        ids = torch.multinomial(pop.expand(T, E), K, replacement=False, generator=g) if T else torch.zeros(0, K)
    else:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    ids = ids.to(torch.int32)
    weights = (2.0 ** -(torch.randint(0, 4, (T, K), generator=g))).float()
    if case.routing == "masked" and T:
        ids[::3] = -1
        ids[1::3, 1] = -1
        weights = torch.where(ids < 0, float("nan"), weights)
    return x, ids, weights


def dequantized(x: torch.Tensor, payload: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """What receivers see of x: the sender's quantize -> dequantize, on the sender's device
    (fp32 on the CPU). The device matters: on an H200, CUDA's fp8 rows differed from the CPU's
    quantization of the same bf16 rows (scale rounding), so compare with the sender's own."""
    if payload == "bf16":
        return x.float()
    from epmoe.quant import quantize_activations

    x = x.to(device)
    backend = "torch" if payload == "fp8_block" and x.shape[1] % 128 else "auto"
    return quantize_activations(x, payload, backend=backend).dequantize(torch.float32).cpu()


def expected_slots(all_ids: list[torch.Tensor], rank: int, placement: Placement, kl: int) -> torch.Tensor:
    """[W, TM, Kl] local expert ids this rank must receive (k order, -1 padded), by plain loops."""
    W = len(all_ids)
    want = torch.full((W, TM, kl), -1, dtype=torch.int32)
    for s, ids in enumerate(all_ids):
        for t in range(ids.shape[0]):
            j = 0
            for e in ids[t].tolist():
                if e >= 0 and int(placement.expert_rank[e]) == rank:
                    want[s, t, j] = int(placement.expert_local[e])
                    j += 1
    return want


def synthetic_experts(d, hidden_dtype: torch.dtype) -> torch.Tensor:
    """out[p] = row * 2^(e % 3) for valid pairs, NaN for padding pairs."""
    rows = as_float(d.hidden)[d.row_ids.long()]  # [M, H]
    factor = 2.0 ** (d.expert_ids.clamp_min(0) % 3).float()
    out = torch.where((d.expert_ids >= 0).unsqueeze(1), rows * factor.unsqueeze(1), float("nan"))
    return out.to(hidden_dtype)


def synthetic_reference(xq: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        placement: Placement) -> torch.Tensor:
    """y[t] = sum_k w[t, k] * 2^(local(e) % 3) * xq[t] over unmasked k (exact in fp32)."""
    local = placement.expert_local[ids.long().clamp_min(0)]
    factor = torch.where(ids >= 0, weights * 2.0 ** (local % 3).to(weights.dtype), 0.0)  # [T, K]
    return xq * factor.sum(dim=1, keepdim=True)


def reference_output(xq: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, full: ExpertWeights) -> torch.Tensor:
    """Single-rank oracle over unmasked pairs, fp32 [T, H]."""
    T, K = ids.shape
    rows = torch.arange(T, dtype=torch.int32).repeat_interleave(K)
    out = reference_experts(xq, rows, ids.reshape(-1), full, CFG).view(T, K, CFG.hidden)
    return torch.where((ids >= 0)[..., None], out * weights[..., None], 0.0).sum(dim=1)


def _full() -> ExpertWeights:
    return ExpertWeights.random(CFG, CFG.num_experts, generator=torch.Generator().manual_seed(0))


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return (y.to(ref.dtype).cpu() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)


def check_case(b: SymmA2A, case: Case, rank: int, world: int, full: ExpertWeights, local: ExpertWeights,
               device: torch.device, dtype: torch.dtype) -> list[str]:
    """Run one case on this rank (dispatch/combine twice, exact and through the reference
    runner); return the failures found (empty = all good)."""
    placement = b.placement
    errors: list[str] = []
    everyone = [inputs(case, s, world) for s in range(world)]
    x, ids, weights = everyone[rank]
    T = x.shape[0]
    payload = b.payload
    tol = EXACT_TOL if dtype == torch.float32 else GPU_TOL
    if case.wrap:
        b.seq = SEQ_WRAP - 1  # the next calls use SEQ_WRAP, 1, 2
        if b._impl == "triton":
            b._state[0] = SEQ_WRAP - 1
    routing = Routing(ids.to(device), weights.to(device))
    # (1) exact dispatch + exact combine with power-of-two experts
    d = b.dispatch(x.to(device, dtype), routing)
    want = expected_slots([ids for _, ids, _ in everyone], rank, placement, b.slot_experts)
    got = d.expert_ids.cpu().view(world, TM, b.slot_experts)
    if not torch.equal(got, want):
        errors.append(f"{case.name}/{payload}: expert ids differ")
    counts = torch.bincount(want[want >= 0].long(), minlength=placement.local_experts).to(torch.int32)
    if not torch.equal(d.expert_counts.cpu(), counts):
        errors.append(f"{case.name}/{payload}: expert counts differ")
    rows = as_float(d.hidden).cpu()  # [W * TM, H]
    for s, (xs, _, _) in enumerate(everyone):
        sent = (want[s, : xs.shape[0]] >= 0).any(dim=1).nonzero().flatten()
        if sent.numel() and not torch.equal(rows[s * TM + sent], dequantized(xs.to(dtype), payload, device)[sent]):
            errors.append(f"{case.name}/{payload}: rows from rank {s} differ")
    y = torch.full((T, CFG.hidden), float("nan"), dtype=dtype, device=device)
    b.combine(synthetic_experts(d, dtype), d, out=y)
    xq = dequantized(x.to(dtype), payload, device)
    want_y = synthetic_reference(xq, ids, weights, placement)
    if payload == "bf16":  # integer rows, power-of-two weights and experts: every sum is exact
        if not torch.equal(y.cpu(), want_y.to(dtype)):
            errors.append(f"{case.name}/{payload}: synthetic combine not exact")
    else:  # dequantized rows carry full fp32 mantissas: sums round, in a different order here.
        # synthetic_experts rounds each row to the activation dtype (exactly xq rounded, scaled by
        # a power of two) and y is cast once: fp32 sums agree to 1e-6, a bf16 cast adds 2^-9.
        want64 = synthetic_reference(xq.to(dtype).double(), ids, weights.double(), placement)
        bound = 1e-6 if dtype == torch.float32 else 2.0**-8
        if _rel(y.double(), want64) > bound or (T and not torch.isfinite(y).all()):
            errors.append(f"{case.name}/{payload}: synthetic combine rel err {_rel(y.double(), want64):.3g}")
    # (2) the reference runner on this rank's experts vs the single-rank oracle
    d = b.dispatch(x.to(device, dtype), routing)
    out = reference_experts(d.hidden, d.row_ids, d.expert_ids, local, CFG)
    y = b.combine(out.to(dtype) if payload == "bf16" else out, d)
    err = _rel(y, reference_output(xq, ids, weights, full))
    if not (err <= tol and y.shape == (T, CFG.hidden)):
        errors.append(f"{case.name}/{payload}: reference runner rel err {err:.3g}")
    return errors


def _rank_cases(group, payloads: tuple[str, ...], cases: list[Case], device: str = "cpu",
                dtype: torch.dtype = torch.float32, combine_mode: str = "push") -> list[str]:
    """One rank of the multi-rank tests: every payload and case on one backend per payload."""
    device = torch.device(device)
    full = _full()
    on_dev = ExpertWeights(full.w13.to(device, dtype), full.w2.to(device, dtype))
    errors: list[str] = []
    for payload in payloads:
        layer = MoELayer.from_global(
            CFG, on_dev, group, comm="symm_a2a",
            comm_options={"max_tokens_per_rank": TM, "payload": payload, "timeout_s": 30.0,
                          "combine_mode": combine_mode},
        )
        b: SymmA2A = layer.comm
        local = full.select(b.placement.global_ids(group.rank))
        local = ExpertWeights(local.w13.to(device), local.w2.to(device))
        # too many tokens: raises before anything is written, and the backend stays usable
        try:
            b.dispatch(torch.zeros(TM + 1, CFG.hidden, device=device, dtype=dtype),
                       Routing(torch.zeros(TM + 1, CFG.top_k, dtype=torch.int32, device=device),
                               torch.ones(TM + 1, CFG.top_k, device=device)))
            errors.append("T > max_tokens_per_rank did not raise")
        except ValueError as exc:
            if "max_tokens_per_rank=8" not in str(exc):
                errors.append(f"unexpected message: {exc}")
        for case in cases:
            errors += check_case(b, case, group.rank, group.world, full, local, device, dtype)
        # the whole layer (router logits -> routing -> dispatch -> runner -> combine)
        g = torch.Generator().manual_seed(7 + group.rank)
        x, logits = torch.randn(5, CFG.hidden, generator=g), torch.randn(5, CFG.num_experts, generator=g)
        y = layer(x.to(device, dtype), logits.to(device))
        ref = MoELayer(CFG, full)(dequantized(x.to(dtype), payload, device), logits)
        err = _rel(y, ref)
        if not err <= (EXACT_TOL if dtype == torch.float32 else GPU_TOL):
            errors.append(f"layer/{payload}: rel err {err:.3g}")
    return errors


@pytest.mark.parametrize("combine_mode", ["push", "pull"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_shared_memory_matches_reference(world, combine_mode):
    results = run_ranks(_rank_cases, world, args=(PAYLOADS, CASES, "cpu", torch.float32, combine_mode), timeout=180)
    for rank, errors in enumerate(results):
        assert not errors, f"rank {rank}: {errors}"


def _rank_silent(group, phase: str, silent: tuple[int, ...], device: str = "cpu") -> str:
    """Ranks in `silent` skip `phase`; the others must time out naming them, not hang. The
    backend lives until every rank is done (peers still write into a silent rank's buffer)."""
    placement = Placement.contiguous(CFG.num_experts, group.world)
    if device != "cpu":
        # every rank compiles the kernels first: on real GPUs a peer still loading its dispatch
        # kernel misses a 0.3 s wait (seen on 2 H200s: the combine case timed out in dispatch)
        warm = make_symm(CFG, group, placement, max_tokens_per_rank=4, device=device)
        x, ids, w = inputs(CASES[0], group.rank, group.world)
        d = warm.dispatch(x[:4].to(device, warm.dtype), Routing(ids[:4].to(device), w[:4].to(device)))
        warm.combine(torch.zeros(d.num_pairs, CFG.hidden, device=device, dtype=warm.dtype), d)
        torch.cuda.synchronize(device)
        group.barrier()
    b = make_symm(CFG, group, placement, max_tokens_per_rank=4, timeout_s=0.3, device=device)
    msg = _silent_call(b, group.rank, phase, silent, device)
    group.barrier()
    return msg


def _silent_call(b: SymmA2A, rank: int, phase: str, silent: tuple[int, ...], device: str) -> str:
    x, ids, w = inputs(CASES[0], rank, b.world)
    routing = Routing(ids[:4].to(device), w[:4].to(device))
    x = x[:4].to(device, b.dtype)
    if rank in silent and phase == "dispatch":
        return "silent"
    t0 = time.monotonic()
    try:  # the split phases: no host agreement, so the flag waits are what bounds them
        b.dispatch_send(x, routing)
        d = b.dispatch_recv()
        if rank in silent:
            return "silent"
        b.combine(torch.zeros(d.num_pairs, CFG.hidden, device=device, dtype=b.dtype), d)
    except SymmTimeoutError as exc:
        took = time.monotonic() - t0
        try:
            b.dispatch_send(x, routing)
            return "no error after a timeout"
        except RuntimeError as again:
            if "unusable" not in str(again):
                return f"unexpected second error: {again}"
        return f"{took:.2f}s {exc}"
    return "no timeout"


def check_silent(results: list[str], phase: str, silent: tuple[int, ...]) -> None:
    for rank, msg in enumerate(results):
        if rank in silent:
            assert msg == "silent"
            continue
        took, _, text = msg.partition(" ")
        assert f"ranks {list(silent)} never signalled" in text, msg
        assert phase in text and "timed out after 0.3s" in text, msg
        assert float(took[:-1]) < 5, msg


@pytest.mark.parametrize(("world", "phase", "silent"), [(2, "dispatch", (1,)), (3, "dispatch", (0, 2)),
                                                       (2, "combine", (1,))])
def test_peer_that_never_arrives_times_out_naming_it(world, phase, silent):
    check_silent(run_ranks(_rank_silent, world, args=(phase, silent), timeout=60), phase, silent)


def _rank_blocking_silent(group, silent: int) -> str:
    """Rank `silent` skips a blocking dispatch; the others wait in its agreement, bounded by the
    group's timeout, and raise CollectiveTimeoutError naming it (a failed job: its ranks start afresh)."""
    b = make_symm(CFG, group, Placement.contiguous(CFG.num_experts, group.world), max_tokens_per_rank=4)
    x, ids, w = inputs(CASES[0], group.rank, group.world)
    if group.rank == silent:
        return "silent"
    b.dispatch(x[:4], Routing(ids[:4], w[:4]))
    return "went ahead"


@pytest.mark.parametrize("world", [2, 3])
def test_blocking_call_a_rank_skips_raises_naming_it(world):
    silent, t0 = world - 1, time.monotonic()
    with pytest.raises(DistError) as err:
        # 5 s, not less: the same bound covers the ranks' process-group setup, which a loaded machine slows
        run_ranks(_rank_blocking_silent, world, args=(silent,), timeout=60, collective_timeout=5.0)
    assert time.monotonic() - t0 < 40
    text = str(err.value)
    assert f"failed on ranks {list(range(world - 1))}" in text, text
    assert text.count("CollectiveTimeoutError: rank ") == world - 1, text
    assert text.count(f"ranks [{silent}] did not arrive") == world - 1, text


def _rank_bad_inputs(group) -> dict[str, str]:
    """One bad input per scenario on one rank; returns each scenario's error on this rank
    ('' = none). A layout disagreement must raise on every rank at setup (construction);
    bad routing ids raise on the bad rank, and every peer raises PeerFailedError naming it in
    the call's agreement, before any flag is written."""
    W, rank = group.world, group.rank
    placement = Placement.contiguous(CFG.num_experts, W)
    scenarios = {
        "hidden": (CFG.replace(hidden=48) if rank == 1 else CFG, {}, torch.float32),
        "config": (CFG.replace(routed_scaling_factor=2.0) if rank == 0 else CFG, {}, torch.float32),
        "payload": (CFG, {"payload": "fp8"} if rank == W - 1 else {}, torch.float32),
        "combine": (CFG, {"combine_dtype": "bf16"} if rank == W - 1 else {}, torch.float32),
        "max_tokens": (CFG, {"max_tokens_per_rank": 6} if rank == 0 else {}, torch.float32),
        "dtype": (CFG, {}, torch.bfloat16 if rank == 0 else torch.float32),
        "combine_mode": (CFG, {"combine_mode": "pull"} if rank == 1 else {}, torch.float32),
        "ids": (CFG, {}, torch.float32),
        "bound": (CFG, {}, torch.float32),
    }
    out = {}
    for key, (cfg, opts, dtype) in scenarios.items():
        x = torch.randn(3, cfg.hidden).to(dtype)
        ids = torch.arange(cfg.top_k, dtype=torch.int32).repeat(3, 1)
        if key == "ids" and rank == W - 1:
            ids[2, 1] = cfg.num_experts
        try:  # the workspace is agreed on and built at construction
            b = make_symm(cfg, group, placement, dtype=dtype, **{"max_tokens_per_rank": 4, "timeout_s": 0.3, **opts})
            bound = 2 if key == "bound" and rank == W - 1 else None  # below this rank's 3 tokens
            d = b.dispatch(x, Routing(ids, torch.ones(3, cfg.top_k)), bound)
            b.combine(torch.zeros(d.num_pairs, cfg.hidden, dtype=dtype), d)
            out[key] = ""
        except (ValueError, SymmTimeoutError) as exc:  # PeerFailedError is a ValueError
            out[key] = f"{type(exc).__name__}: {exc}"
        group.barrier()
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_that_disagree_or_pass_bad_ids_raise_naming_them(world):
    results = run_ranks(_rank_bad_inputs, world, timeout=120)
    last = world - 1
    expect = {
        "hidden": ("ranks [1] differ from rank 0 on hidden", "rank 1: 48"),
        "config": ("on config",),
        "payload": (f"ranks [{last}] differ from rank 0 on payload", f"rank {last}: fp8"),
        "combine": (f"ranks [{last}] differ from rank 0 on combine dtype", f"rank {last}: torch.bfloat16"),
        "max_tokens": ("on max_tokens_per_rank", "rank 0: 6"),
        "dtype": ("on row dtype", "rank 0: torch.bfloat16"),
        "combine_mode": ("ranks [1] differ from rank 0 on combine_mode", "rank 0: push, rank 1: pull"),
    }
    for rank, msgs in enumerate(results):
        for key, words in expect.items():
            assert msgs[key].startswith("ValueError"), (rank, key, msgs[key])
            for word in words:
                assert word in msgs[key], (rank, key, msgs[key])
        if rank == last:
            assert msgs["bound"].startswith("ValueError: symm_a2a rank") and "max_tokens=2 must be an int between " \
                "this rank's 3 tokens" in msgs["bound"], msgs["bound"]
        else:
            assert msgs["bound"].startswith("PeerFailedError") and f"rank {last} failed its own checks" in \
                msgs["bound"], msgs["bound"]
        if rank == last:
            assert msgs["ids"].startswith("ValueError") and f"outside [0, {CFG.num_experts})" in msgs["ids"], msgs
            assert f"token 2, k 1: id {CFG.num_experts}" in msgs["ids"], msgs["ids"]
        else:
            assert msgs["ids"].startswith("PeerFailedError"), msgs["ids"]
            assert (f"call 1: rank {last} failed its own checks, so no rank goes ahead (rank {last}: ValueError: "
                    f"symm_a2a rank {last}: routing ids outside [0, {CFG.num_experts})") in msgs["ids"], msgs["ids"]


def test_virtual_ranks_on_cpu_match_reference():
    errors = VirtualGroup(3).run(lambda g: _rank_cases(g, ("bf16", "nvfp4"), CASES[:3]))
    assert not any(errors), errors


def _rank_bounded(group, device: str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """dispatch(..., max_tokens=B): equal bounds on every rank give the unbounded call's output
    bit for bit from a pair list of W * B * Kl; a rank whose bound a peer's T exceeds raises
    naming that peer (and works on the next call); the layer under comm="auto" passes the
    agreed T and matches the single-rank reference."""
    W, rank, errors = group.world, group.rank, []
    placement = Placement.contiguous(CFG.num_experts, W)
    b = make_symm(CFG, group, placement, max_tokens_per_rank=TM, timeout_s=30.0, device=device, dtype=dtype)

    def call(case: Case, bound: int | None) -> tuple[torch.Tensor, int]:
        x, ids, w = inputs(case, rank, W)
        d = b.dispatch(x.to(device, dtype), Routing(ids.to(device), w.to(device)), max_tokens=bound)
        return b.combine(synthetic_experts(d, dtype), d), d.num_pairs

    case = CASES[0]  # uneven, one rank empty
    B = max(case.tokens[:W])
    full, m_full = call(case, None)
    bounded, m_bounded = call(case, B)
    if not torch.equal(full, bounded) or m_full != W * TM * b.slot_experts or m_bounded != W * B * b.slot_experts:
        errors.append(f"bound {B}: pairs {m_bounded} (full {m_full}), outputs equal {torch.equal(full, bounded)}")
    # unequal bounds: each rank passes its own T; ranks below the largest T see a peer exceed theirs
    biggest = max(range(W), key=lambda r: case.tokens[r])
    try:
        call(case, case.tokens[rank])
        if case.tokens[rank] < B:
            errors.append("no error though a peer sent more tokens than this rank's bound")
    except ValueError as exc:
        want = f"rank {biggest} sent {B} tokens"
        if case.tokens[rank] >= B or want not in str(exc) or "same max_tokens" not in str(exc):
            errors.append(f"unexpected error: {exc}")
    again, _ = call(case, B)
    if not torch.equal(again, full):
        errors.append("the call after a bound error differs")
    try:
        call(case, TM + 1)
        errors.append("max_tokens past the workspace did not raise")
    except ValueError as exc:
        if "max_tokens_per_rank=8" not in str(exc):
            errors.append(f"unexpected message: {exc}")
    group.barrier()
    # the layer under comm="auto": the agreed T goes to dispatch as the bound
    weights = _full()
    layer = MoELayer.from_global(CFG, ExpertWeights(weights.w13.to(device, dtype), weights.w2.to(device, dtype)),
                                 group, comm="auto", comm_options={"max_tokens_per_rank": TM})
    symm = layer.comms["symm_a2a"]
    bounds = []
    real_start = symm.dispatch_start  # every dispatch goes through its send half
    symm.dispatch_start = lambda x, r, max_tokens=None: bounds.append(max_tokens) or real_start(x, r, max_tokens)
    g = torch.Generator().manual_seed(11 + rank)
    T = (5, 2, 0, 7)[rank]
    x, logits = torch.randn(T, CFG.hidden, generator=g), torch.randn(T, CFG.num_experts, generator=g)
    y = layer(x.to(device, dtype), logits.to(device))
    err = _rel(y, MoELayer(CFG, weights)(x.to(dtype).float(), logits))
    agreed = max((5, 2, 0, 7)[:W])
    if layer.combo.comm != "symm_a2a" or bounds != [agreed] or not err <= (EXACT_TOL if dtype == torch.float32
                                                                          else GPU_TOL):
        errors.append(f"auto layer: comm {layer.combo.comm}, bounds {bounds} (want [{agreed}]), rel err {err:.3g}")
    return errors


@pytest.mark.parametrize("world", [2, 3])
def test_dispatch_bound_on_tokens_over_gloo(world):
    for rank, errors in enumerate(run_ranks(_rank_bounded, world, timeout=120)):
        assert not errors, f"rank {rank}: {errors}"


def _rank_bf16_combine(group, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[float, float, bool]:
    """The reference runner through symm_a2a with bf16 partial sums on the combine wire, and with
    fp32 ones: (rel err bf16, rel err fp32, outputs differ)."""
    full = _full()
    on_dev = ExpertWeights(full.w13.to(device, dtype), full.w2.to(device, dtype))
    case = Case("bf16_combine", (7, 3, 0, 5, 8, 1, 2, 6), routing="skew")
    x, ids, w = inputs(case, group.rank, group.world)
    x = torch.randn(x.shape, generator=_gen(case, group.rank))  # dense values: the rounding shows
    ref = reference_output(x.to(dtype).float(), ids, w, full)
    ys = {}
    for combine in ("bf16", "fp32"):
        layer = MoELayer.from_global(CFG, on_dev, group, comm="symm_a2a", comm_options={
            "max_tokens_per_rank": TM, "combine_dtype": combine})
        ys[combine] = layer(x.to(device, dtype), routing=Routing(ids.to(device), w.to(device)))
    return _rel(ys["bf16"], ref), _rel(ys["fp32"], ref), not torch.equal(ys["bf16"], ys["fp32"])


def test_bf16_combine_wire_within_its_bound():
    # each of at most 3 expert ranks' partial sums rounded once to bf16 (2^-9 relative to it):
    # 1e-2 of the largest output, as for the other backends (tests/test_comm.py BF16_COMBINE_TOL)
    results = VirtualGroup(3).run(_rank_bf16_combine)
    for err_bf16, err_fp32, _ in results:
        assert err_fp32 <= EXACT_TOL and err_bf16 <= 1e-2, (err_bf16, err_fp32)
    assert any(differ for *_, differ in results)  # the wire really is bf16


def test_construction_checks_and_memory_formula():
    placement = Placement.contiguous(CFG.num_experts, 2)
    group = None
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        make_symm(CFG, group, Placement.contiguous(CFG.num_experts, 1), max_tokens_per_rank=0)
    with pytest.raises(ValueError, match="unknown payload"):
        make_symm(CFG, group, Placement.contiguous(CFG.num_experts, 1), payload="int4")
    with pytest.raises(ValueError, match="combine_mode must be 'push' or 'pull'"):
        make_symm(CFG, group, Placement.contiguous(CFG.num_experts, 1), combine_mode="get")
    with pytest.raises(ValueError, match="nvfp4 payloads need hidden % 16"):
        make_symm(CFG.replace(hidden=40), group, Placement.contiguous(CFG.num_experts, 1), payload="nvfp4")
    # the docstring's formula, region by region, before 128-byte alignment
    W, Tm, H, Kl = 2, 16, CFG.hidden, min(CFG.top_k, placement.local_experts)
    for payload, row in (("bf16", 2 * H), ("fp8", H + 4), ("fp8_block", H + 4), ("nvfp4", H // 2 + H // 16 + 4)):
        n = SymmA2A.workspace_bytes(CFG, W, Tm, payload, torch.bfloat16)
        formula = 12 * W + W * Tm * (8 * Kl + row + 4 * H)
        assert formula <= n <= formula + 7 * 128, (payload, n, formula)
    ds = MoEConfig.from_preset("deepseek-v3")
    mib = SymmA2A.workspace_bytes(ds, 8, 128, "bf16") / 2**20
    assert 42 < mib < 42.2  # the docstring's example


def test_one_rank_without_a_group():
    full = _full()
    layer = MoELayer(CFG, full, comm="symm_a2a", comm_options={"max_tokens_per_rank": 6})
    g = torch.Generator().manual_seed(3)
    for T in (6, 0, 1):
        x, logits = torch.randn(T, CFG.hidden, generator=g), torch.randn(T, CFG.num_experts, generator=g)
        assert _rel(layer(x, logits), MoELayer(CFG, full)(x, logits)) <= EXACT_TOL
    assert layer.comm.seq == 3


def test_received_rows_are_overwritten_once_combine_send_raised_its_flags():
    """The receive buffer is a view: after this rank's combine_send, a peer that finished its
    combine may dispatch its next call into it, before this rank's combine_recv."""
    bs = _virtual_backends(2, impl="torch", device="cpu", dtype=torch.float32)
    everyone = [inputs(CASES[1], r, 2) for r in range(2)]  # one token per rank
    one_rank = [torch.full_like(i, CFG.num_experts // 2 - 1) for _, i, _ in everyone]  # both to rank 0
    routings = [Routing(i, torch.ones_like(w)) for i, (_, _, w) in zip(one_rank, everyone)]
    for b, (x, _, _), r in zip(bs, everyone, routings):
        b.dispatch_send(x, r)
    ds = [b.dispatch_recv() for b in bs]
    rows = ds[0].hidden[1 * TM]  # rank 1's token as it landed on rank 0
    assert torch.equal(rows, everyone[1][0][0])
    for b, d in zip(bs, ds):
        b.combine_send(torch.zeros(d.num_pairs, CFG.hidden), d)
    bs[1].combine_recv(ds[1])  # rank 1 is done with call 1 ...
    bs[1].dispatch_send(-everyone[1][0], routings[1])  # ... and starts call 2 into rank 0's slots
    assert torch.equal(rows, -everyone[1][0][0])  # rank 0 has not finished call 1, its view changed
    assert bs[0].combine_recv(ds[0]).shape == (1, CFG.hidden)


# ---- the Triton kernels on the CPU interpreter, phase by phase ----------------------------------

interpreted = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton interpreter runs the kernels on the CPU only where no GPU is present",
)


def make_symm(cfg: MoEConfig, group, placement: Placement, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, **options) -> SymmA2A:
    """A symm_a2a backend as the layer builds it (rows of dtype: by default bf16 on CUDA, fp32
    on the CPU); options through make_options."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return SymmA2A(cfg, group, placement, SymmA2A.make_options(**options), device=device, dtype=dtype)


def _virtual_backends(world: int, **options) -> list[SymmA2A]:
    placement = Placement.contiguous(CFG.num_experts, world)
    return VirtualGroup(world).run(lambda g: make_symm(CFG, g, placement, max_tokens_per_rank=TM, **options))


def split_phase_call(bs: list[SymmA2A], xs, routings, expert_fn, bound: int | None = None) -> list[torch.Tensor]:
    """One call on W virtual ranks from one thread: every send, then every receive."""
    for b, x, r in zip(bs, xs, routings):
        b.dispatch_send(x, r, bound)
    ds = [b.dispatch_recv() for b in bs]
    outs = [expert_fn(r, d) for r, d in enumerate(ds)]
    for b, out, d in zip(bs, outs, ds):
        b.combine_send(out, d)
    return [b.combine_recv(d) for b, d in zip(bs, ds)]


@interpreted
@pytest.mark.parametrize(("world", "payload", "combine", "mode", "bounded"), [
    (2, "bf16", "fp32", "push", False), (2, "nvfp4", "fp32", "push", False), (3, "fp8", "fp32", "push", False),
    (3, "fp8_block", "fp32", "push", False), (2, "bf16", "bf16", "push", False), (3, "bf16", "fp32", "pull", False),
    (2, "fp8", "bf16", "pull", False), (3, "bf16", "fp32", "push", True), (2, "nvfp4", "fp32", "pull", True)])
def test_triton_kernels_interpreted_match_torch_twin(world, payload, combine, mode, bounded):
    """Every case, the wrap of the sequence numbers and all-empty calls included: the kernels
    equal the plain-torch twin bit for bit (with bf16 partial sums: within the rounding of the
    interpreter's cast, see _interpreted_call). bounded: every call passes max_tokens = the
    largest T over ranks (0 for the all-empty case), as the layer does under comm="auto"."""
    opts = {"payload": payload, "device": "cpu", "dtype": torch.float32, "combine_dtype": combine,
            "combine_mode": mode}
    kernels = _virtual_backends(world, impl="triton", **opts)
    twins = _virtual_backends(world, impl="torch", **opts)
    seq = 0
    for case in CASES:
        if case.wrap:  # the next calls use SEQ_WRAP, then 1
            seq = SEQ_WRAP - 1
            for b in kernels + twins:
                b.seq = seq
            for b in kernels:
                b._state[0] = seq
        for _ in range(2 if case.wrap else 1):
            bound = max(case.tokens[:world]) if bounded else None
            _interpreted_call(kernels, twins, case, payload, exact=combine == "fp32", max_tokens=bound)
            seq = seq % SEQ_WRAP + 1
            assert int(kernels[0]._state[0]) == seq  # the device sequence number advanced once
    assert seq == 1  # the last case wrapped


def _interpreted_call(kernels: list[SymmA2A], twins: list[SymmA2A], case: Case, payload: str,
                      exact: bool = True, max_tokens: int | None = None) -> None:
    world = len(kernels)
    everyone = [inputs(case, r, world) for r in range(world)]
    xs = [x for x, _, _ in everyone]
    routings = [Routing(i, w) for _, i, w in everyone]
    seen: dict[str, list] = {}

    def experts(tag):
        def fn(r, d):
            seen.setdefault(tag, []).append((d.expert_ids.clone(), d.row_ids.clone(), as_float(d.hidden).clone()))
            return synthetic_experts(d, torch.float32)
        return fn

    ys = split_phase_call(kernels, xs, routings, experts("triton"), max_tokens)
    want = split_phase_call(twins, xs, routings, experts("torch"), max_tokens)
    for r in range(world):
        kid, krow, krows = seen["triton"][r]
        tid, trow, trows = seen["torch"][r]
        assert torch.equal(kid, tid) and torch.equal(krow, trow)
        assert kid.numel() == world * (TM if max_tokens is None else max_tokens) * kernels[r].slot_experts
        valid = krow[kid >= 0].long()  # the rows some pair reads
        assert torch.equal(krows[valid], trows[valid])
        if exact:
            assert torch.equal(ys[r], want[r])
        else:  # the interpreter casts fp32 -> bf16 by truncation (337.0 -> 336, torch and the GPU
            # round to nearest even: 338): one bf16 step per partial sum, never more
            assert _rel(ys[r], want[r]) <= 2 * 2.0**-8
        xq = dequantized(xs[r], payload).double()
        want64 = synthetic_reference(xq, everyone[r][1], everyone[r][2].double(), kernels[r].placement)
        # bf16 partial sums: each rank's partial rounded once (2^-8 relative when truncated), up to
        # 3 per token
        bound = (0 if payload == "bf16" else 1e-6) if exact else 3 * 2.0**-8
        assert _rel(ys[r].double(), want64) <= bound


@interpreted
def test_triton_bound_overflow_interpreted_raises_naming_the_source():
    """Rank 1 runs with max_tokens=0 while rank 0 sends 5 tokens: the kernels stay in bounds,
    rank 1's check() names rank 0 once, and the next call with equal bounds is right."""
    bs = _virtual_backends(2, impl="triton", device="cpu", dtype=torch.float32)
    ev = [inputs(CASES[0], r, 2) for r in range(2)]  # tokens 5 and 0
    xs, routings = [x for x, _, _ in ev], [Routing(i, w) for _, i, w in ev]
    for b, x, r, bound in zip(bs, xs, routings, (5, 0)):
        b.dispatch_send(x, r, bound)
    ds = [b.dispatch_recv() for b in bs]
    assert ds[1].num_pairs == 0
    for b, d in zip(bs, ds):
        b.combine_send(synthetic_experts(d, torch.float32), d)
    for b, d in zip(bs, ds):
        b.combine_recv(d)
    bs[0].check()
    with pytest.raises(ValueError, match="rank 1: rank 0 sent 5 tokens"):
        bs[1].check()
    bs[1].check()  # reported once
    ys = split_phase_call(bs, xs, routings, lambda r, d: synthetic_experts(d, torch.float32), 5)
    want = synthetic_reference(xs[0].double(), ev[0][1], ev[0][2].double(), bs[0].placement)
    assert _rel(ys[0].double(), want) == 0


@interpreted
@pytest.mark.parametrize("phase", ["dispatch", "combine"])
def test_triton_timeout_interpreted_names_the_silent_rank(phase):
    bs = _virtual_backends(2, impl="triton", device="cpu", dtype=torch.float32, timeout_s=0.02)
    _one_silent_rank(bs, phase, "cpu", torch.float32)
    with pytest.raises(SymmTimeoutError, match=rf"{phase}: ranks \[1\] never signalled"):
        bs[0].check()


def _one_silent_rank(bs: list[SymmA2A], phase: str, device: str, dtype: torch.dtype) -> None:
    """Rank 1 of two virtual ranks skips `phase`; rank 0's wait in that phase gives up."""
    ev = [inputs(CASES[0], r, 2) for r in range(2)]
    senders = bs if phase == "combine" else bs[:1]
    for b, (x, ids, w) in zip(senders, ev):
        b.dispatch_send(x.to(device, dtype), Routing(ids.to(device), w.to(device)))
    ds = [b.dispatch_recv() for b in senders]
    if phase == "combine":  # rank 1 received, but never raises its combine flags
        M = 2 * TM * bs[0].slot_experts
        bs[0].combine_send(torch.zeros(M, CFG.hidden, device=device, dtype=dtype), ds[0])
        bs[0].combine_recv(ds[0])


# ---- GPU: virtual ranks on one GPU --------------------------------------------------------------


def _compile_once(world: int, device: str, dtype: torch.dtype, combine_mode: str = "push") -> None:
    """Launch every kernel variant the threaded test uses from one thread first (Triton compiles
    each variant once instead of racing to compile it from W threads)."""
    for payload in PAYLOADS:
        bs = _virtual_backends(world, payload=payload, impl="triton", device=device, dtype=dtype, timeout_s=30.0,
                               combine_mode=combine_mode)
        out_dtype = dtype if payload == "bf16" else torch.float32  # the reference runner's output
        for case in (CASES[0], CASES[1]):
            ev = [inputs(case, r, world) for r in range(world)]
            split_phase_call(bs, [x.to(device, dtype) for x, _, _ in ev],
                             [Routing(i.to(device), w.to(device)) for _, i, w in ev],
                             lambda r, d, out_dtype=out_dtype: synthetic_experts(d, out_dtype))
        for b in bs:
            b.check()


@pytest.mark.gpu
@pytest.mark.parametrize(("world", "combine_mode"), [(2, "push"), (4, "push"), (8, "push"), (4, "pull")])
def test_gpu_virtual_ranks_match_reference(world, combine_mode):
    _compile_once(world, "cuda", torch.bfloat16, combine_mode)
    errors = VirtualGroup(world, timeout=120).run(
        lambda g: _rank_cases(g, PAYLOADS, CASES, device="cuda", dtype=torch.bfloat16, combine_mode=combine_mode))
    assert not any(errors), errors


@pytest.mark.gpu
def test_gpu_dispatch_bound_on_tokens_virtual_ranks():
    errors = VirtualGroup(2, timeout=120).run(lambda g: _rank_bounded(g, "cuda", torch.bfloat16))
    assert not any(errors), errors


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_new_routing_and_token_counts():
    world = 4
    bs = _virtual_backends(world, impl="triton", device="cuda", dtype=torch.bfloat16, check_errors=False)
    placement = bs[0].placement
    graphs = []
    for tokens in ((TM, 0, 3, 1), (1, 1, 1, 1)):  # one graph per token-count bucket
        xs = [torch.zeros(t, CFG.hidden, device="cuda", dtype=torch.bfloat16) for t in tokens]
        ids = [torch.zeros(t, CFG.top_k, device="cuda", dtype=torch.int32) for t in tokens]
        ws = [torch.zeros(t, CFG.top_k, device="cuda") for t in tokens]
        ys = [torch.zeros(t, CFG.hidden, device="cuda", dtype=torch.bfloat16) for t in tokens]
        routings = [Routing(i, w) for i, w in zip(ids, ws)]

        def step(xs=xs, routings=routings, ys=ys):
            for b, x, r in zip(bs, xs, routings):
                b.dispatch_send(x, r)
            ds = [b.dispatch_recv() for b in bs]
            outs = [synthetic_experts(d, torch.bfloat16) for d in ds]
            for b, out, d in zip(bs, outs, ds):
                b.combine_send(out, d)
            for b, d, y in zip(bs, ds, ys):
                b.combine_recv(d, out=y)

        for r in range(world):  # valid routing for the warm-up call
            ids[r].copy_(torch.arange(CFG.top_k, dtype=torch.int32).expand(tokens[r], -1))
        step()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        graphs.append((g, tokens, xs, ids, ws, ys))
    for it in range(6):
        g, tokens, xs, ids, ws, ys = graphs[it % 2]
        case = Case(f"graph{it}", tokens + (0,) * 4, routing=("random", "one_rank", "masked")[it % 3])
        everyone = [inputs(case, r, world) for r in range(world)]
        for r, (x, i, w) in enumerate(everyone):
            xs[r].copy_(x)
            ids[r].copy_(i)
            ws[r].copy_(w)
        g.replay()
        torch.cuda.synchronize()
        for r, (x, i, w) in enumerate(everyone):
            bs[r].check()
            want = synthetic_reference(x.to(torch.bfloat16).float(), i, w, placement).to(torch.bfloat16)
            assert torch.equal(ys[r].cpu(), want), (it, r)
    assert int(bs[0]._state[0]) == 2 + 6  # two warm-ups + replays advanced the device sequence number


@pytest.mark.gpu
@pytest.mark.parametrize("phase", ["dispatch", "combine"])
def test_gpu_peer_that_never_arrives_times_out(phase):
    bs = _virtual_backends(2, impl="triton", device="cuda", dtype=torch.bfloat16, timeout_s=0.2)
    t0 = time.monotonic()
    _one_silent_rank(bs, phase, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    assert time.monotonic() - t0 < 5
    with pytest.raises(SymmTimeoutError, match=rf"{phase}: ranks \[1\] never signalled"):
        bs[0].check()


@pytest.mark.gpu
def test_gpu_send_kernels_publish_through_system_scope_counters():
    """The "programs done" counters of both send kernels are acq_rel at system scope (the
    program stores they order go to, or are read by, peer GPUs): read off the compiled PTX."""
    import re

    bs = _virtual_backends(2, impl="triton", device="cuda", dtype=torch.bfloat16)
    x, ids, w = inputs(CASES[0], 0, 2)
    sent = bs[0]._triton_dispatch_send(x.cuda().bfloat16(), Routing(ids.cuda(), w.cuda()))
    M = 2 * TM * bs[0].slot_experts
    combined = bs[0]._triton_combine_send(torch.zeros(M, CFG.hidden, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    for kernel in (sent, combined):
        counters = [ln for ln in kernel.asm["ptx"].splitlines() if re.search(r"\batom\.", ln) and ".add." in ln
                    and "acq_rel" in ln]
        assert counters, "no acq_rel atomic add in the PTX"
        assert all(".sys" in ln for ln in counters), counters
        flags = [ln for ln in kernel.asm["ptx"].splitlines() if re.search(r"\batom\.", ln) and ".exch." in ln]
        assert flags and all(".release" in ln and ".sys" in ln for ln in flags), flags


@pytest.mark.gpu
def test_gpu_bench_virtual_rows_report_bytes_and_hbm_fraction():
    """`epmoe bench comm` on one GPU: symm_a2a timed through graph replays, real byte counts,
    GB/s rated against the HBM copy bandwidth measured in the same run."""
    from epmoe.bench.comm import bench_comm_virtual

    cfg = MoEConfig(hidden=1024, intermediate=128, num_experts=64, top_k=8)
    rows = bench_comm_virtual(cfg, 4, [0, 1, 64], iters=5, warmup=2)
    assert [r["tokens"] for r in rows] == [0, 1, 64]
    for r in rows:
        assert r["timing"] == "graph" and r["link"].startswith("HBM copy") and r["dispatch_us"] > 0, r
        if r["tokens"]:
            assert r["dispatch_bytes"] > r["tokens"] * 8 * 8 and r["combine_bytes"] > 0, r
            assert 0 < r["link_frac"] < 1.5 and r["dispatch GB/s"] > 0, r
