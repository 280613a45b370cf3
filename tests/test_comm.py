"""The dp comm backends (allgather, nccl_a2a) against the single-rank reference.

Every case runs dispatch -> reference runner -> combine on W ranks (gloo processes, and virtual
ranks) and compares each rank's output for its own tokens with the reference MoE over the
same expert choices. Outputs are pre-filled with NaN to catch unwritten rows; padding and masked
pairs carry NaN weights to prove they are masked, never multiplied. One `run_ranks` call per
world size runs every case (the results are cached for the tests that read them).
"""

from __future__ import annotations

import functools
import json
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from types import SimpleNamespace

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Placement, VirtualGroup
from epmoe.comm import CommBackend, get_comm
from epmoe.comm.payload import row_layout
from epmoe.experts.reference import ReferenceRunner, reference_experts
from epmoe.group import VirtualGroupError
from epmoe.routing import Routing
from tests.dist import run_ranks

CFG = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=32, intermediate=16, num_experts=24).replace(top_k=4)
BACKENDS = ("allgather", "nccl_a2a")

# Error bounds, relative to the largest reference value.
# fp32 end to end: only the summation order differs (per-rank partial sums, then rank order).
EXACT_TOL = 1e-5
# bf16 combine wire: each per-rank partial sum is rounded once to bf16 (2^-9 relative); with at
# most 4 partials per token, 1e-2 of the largest output leaves a 2x margin over 4 * 2^-9.
BF16_COMBINE_TOL = 1e-2
# Quantized payloads against the *unquantized* reference. e4m3 keeps 3 mantissa bits (2^-4
# relative per element); with H = 32, I = 16 and as few as one token little of it averages
# out: 15% (10% seen for one token); nvfp4 (e2m1, one scale
# per 16 values) rounds up to 1/6 of a block's max per element, and H = 32 is only two blocks
# per row, so little averages out: 50% (35% seen with 3 tokens). The tight check is against
# the reference run on the same quantize -> dequantize of each rank's rows (EXACT_TOL).
FORMAT_TOL = {"fp8": 0.15, "fp8_block": 0.15, "nvfp4": 0.5}


@dataclass(frozen=True)
class Case:
    """One scenario. tokens: per rank (the first W entries are used)."""

    name: str
    tokens: tuple[int, ...]
    routing: str = "uniform"  # uniform | powerlaw | one_expert | one_rank | masked
    payload: str | None = None
    combine_dtype: str = "fp32"
    static: bool = False
    top_k: int = 4
    gather: str = "auto"  # allgather only

    def cfg(self) -> MoEConfig:
        return CFG.replace(top_k=self.top_k)

    def options(self, backend: str) -> dict:
        opts: dict = {"payload": self.payload, "combine_dtype": self.combine_dtype}
        if backend == "allgather":
            opts["gather"] = self.gather
        if self.static:
            opts.update(static_shapes=True, max_tokens_per_rank=max(max(self.tokens), 1))
        return opts

    def tol(self) -> float:
        return BF16_COMBINE_TOL if self.combine_dtype == "bf16" else EXACT_TOL


UNEVEN = (7, 0, 5, 3, 2, 6, 1, 4)
CASES = [
    Case("uniform", UNEVEN),
    Case("gather_padded", UNEVEN, gather="padded"),
    Case("gather_a2a", (3, 3, 3, 3, 3, 3, 3, 3), gather="a2a"),
    Case("balanced", (4, 4, 4, 4, 4, 4, 4, 4)),
    Case("fp8", UNEVEN, payload="fp8"),
    Case("fp8_block", UNEVEN, payload="fp8_block"),
    Case("nvfp4", UNEVEN, payload="nvfp4"),
    Case("bf16_combine", UNEVEN, combine_dtype="bf16"),
    Case("static", UNEVEN, static=True),
    Case("static_nvfp4", (3, 1, 0, 2, 0, 1, 1, 2), payload="nvfp4", static=True),
    Case("powerlaw", (16, 9, 0, 12, 3, 8, 5, 1), routing="powerlaw"),
    Case("one_expert", (4, 3, 2, 1, 4, 3, 2, 1), routing="one_expert", top_k=1),
    Case("one_rank", (6, 2, 0, 5, 1, 1, 3, 2), routing="one_rank", top_k=3),
    Case("masked", (9, 4, 6, 0, 3, 3, 3, 3), routing="masked"),
    Case("t1_rank0", (1, 0, 0, 0, 0, 0, 0, 0)),
    Case("all_empty", (0,) * 8),
    Case("static_t1", (1, 0, 0, 0, 0, 0, 0, 0), static=True),
]


def _gen(case: Case, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{case.name}/{rank}".encode()))


def _inputs(case: Case, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] fp32, ids [T, K] int32 (-1 = masked pair), weights [T, K] fp32 of one rank."""
    cfg, g = case.cfg(), _gen(case, rank)
    T, E, K = case.tokens[rank], cfg.num_experts, cfg.top_k
    x = torch.randn(T, cfg.hidden, generator=g)
    weights = torch.rand(T, K, generator=g) + 0.1
    if case.routing == "powerlaw":  # expert e drawn with probability ~ (e + 1)^-1.5
        pop = (torch.arange(E, dtype=torch.float32) + 1) ** -1.5
        ids = torch.multinomial(pop.expand(T, E), K, replacement=False, generator=g) if T else torch.zeros(0, K)
    elif case.routing == "one_expert":
        ids = torch.full((T, K), 5)
    elif case.routing == "one_rank":  # every token's experts live on the last rank
        per = E // world
        ids = torch.rand(T, per, generator=g).argsort(dim=1)[:, :K] + per * (world - 1)
    else:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    ids = ids.to(torch.int32)
    if case.routing == "masked" and T:
        ids[::3] = -1  # whole tokens masked
        ids[1::3, 1] = -1  # single pairs masked
        weights = torch.where(ids < 0, torch.full_like(weights, float("nan")), weights)
    return x, ids, weights


def _dequantized(x: torch.Tensor, payload: str | None, device: str = "cpu") -> torch.Tensor:
    """What the receivers see of x: quantize -> dequantize on the sending rank (plain torch on
    the CPU; on a GPU the sender's own wire encoder, whose Triton quantizers may round scales
    differently from the CPU's)."""
    from epmoe import quant

    if payload in (None, "bf16"):
        return x
    if device != "cpu":
        from epmoe.comm.payload import decode, encode

        return decode(encode(x.to(device), payload), payload, x.shape[1]).dequantize(torch.float32).cpu()
    q = {"fp8": quant.quantize_fp8, "fp8_block": quant.quantize_fp8_groups_torch,
         "nvfp4": quant.quantize_nvfp4_torch}[payload](x)
    return q.dequantize(torch.float32)


def reference_output(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, full: ExpertWeights,
                     cfg: MoEConfig) -> torch.Tensor:
    """Single-rank oracle: sum over unmasked k of weights * expert(x), fp32 [T, H]."""
    T, K = ids.shape
    rows = torch.arange(T, dtype=torch.int32).repeat_interleave(K)
    out = reference_experts(x, rows, ids.reshape(-1), full, cfg).view(T, K, x.shape[1])  # [T, K, H]
    contrib = torch.where((ids >= 0)[..., None], out * weights[..., None], torch.zeros(()))
    return contrib.sum(dim=1)


def build(name: str, cfg: MoEConfig, group, placement: Placement, *, device: str = "cpu",
          dtype: torch.dtype = torch.float32, **options) -> CommBackend:
    """A comm backend as the layer builds it: its options through make_options."""
    cls = get_comm(name)
    return cls(cfg, group, placement, cls.make_options(**options), device=torch.device(device), dtype=dtype)


def _full(cfg: MoEConfig) -> ExpertWeights:
    return ExpertWeights.random(cfg, cfg.num_experts, generator=torch.Generator().manual_seed(0))


def _run_case(group, case: Case, name: str, device: str = "cpu") -> dict:
    """One case on this rank: outputs vs the reference, bytes and rows moved, determinism.
    device: where x, routing and the experts live ("cuda" under NCCL ranks; fp32 either way)."""
    rank = group.rank if group is not None else 0
    world = group.world if group is not None else 1
    cfg = case.cfg()
    full = _full(cfg)
    placement = Placement.contiguous(cfg.num_experts, world)
    backend = build(name, cfg, group, placement, device=device, **case.options(name))
    local = full.select(placement.global_ids(rank))
    runner = ReferenceRunner(cfg, ExpertWeights(local.w13.to(device), local.w2.to(device)))
    x, ids, w = _inputs(case, rank, world)
    outs, dispatched = [], None
    for _ in range(2):  # twice: repeated runs must be bitwise equal
        d = backend.dispatch(x.to(device), Routing(ids.to(device), w.to(device)))
        y = torch.full_like(x, float("nan"), device=device)
        backend.combine(runner(d), d, out=y)
        outs.append(y.cpu())
        dispatched = d
    # Everyone's inputs, to count what should have arrived here.
    every = [_inputs(case, r, world) for r in range(world)]
    owner = placement.expert_rank
    expect_rows = sum(
        int(((i >= 0) & (owner[i.clamp_min(0).long()] == rank)).any(dim=1).sum()) for _, i, _ in every
    )
    layout = row_layout(cfg, backend.payload, x.dtype)
    ref_q = reference_output(_dequantized(x, case.payload, device), ids, w, full, cfg)
    ref = reference_output(x, ids, w, full, cfg)
    scale = max(ref.abs().max().item(), 1e-6) if ref.numel() else 1.0
    err = lambda a, b: (a - b).abs().max().item() / scale if a.numel() else 0.0  # noqa: E731
    h = dispatched.handle
    return {
        "case": case.name, "backend": name, "rank": rank,
        "finite": bool(torch.isfinite(outs[0]).all()),
        "err": err(outs[0], ref_q), "tol": case.tol(),
        "format_err": err(outs[0], ref), "format_tol": FORMAT_TOL.get(case.payload or "", case.tol()),
        "bitwise_repeat": torch.equal(outs[0], outs[1]),
        "rows_received": dispatched.hidden.shape[0], "rows_expected": expect_rows,
        "valid_pairs": int((dispatched.expert_ids >= 0).sum()), "num_pairs": dispatched.num_pairs,
        "pairs_expected": sum(int(((i >= 0) & (owner[i.clamp_min(0).long()] == rank)).sum()) for _, i, _ in every),
        "counts_match": bool((dispatched.expert_counts.sum() == (dispatched.expert_ids >= 0).sum()).item()),
        "dispatch_bytes": h.dispatch_bytes, "row_bytes": layout.nbytes,
        "padded": bool(getattr(h, "cap", 0)), "tokens": case.tokens[:world],
    }


def _bad_inputs(group, name: str) -> dict[str, str]:
    """Each bad input on one rank; every rank must raise (no rank left waiting). Returns the
    message each rank got per scenario ('' = no error)."""
    rank, world = group.rank, group.world
    placement = Placement.contiguous(CFG.num_experts, world)
    results = {}
    scenarios = {
        "hidden": (CFG.replace(hidden=48) if rank == 1 else CFG, {}),
        "config": (CFG.replace(routed_scaling_factor=2.0) if rank == 0 else CFG, {}),
        "payload": (CFG, {"payload": "fp8"} if rank == world - 1 else {}),
        "ids": (CFG, {}),
        "dtype": (CFG, {}),
    }
    for key, (cfg, opts) in scenarios.items():
        x = torch.randn(3, cfg.hidden, dtype=torch.bfloat16 if key == "dtype" and rank == 0 else torch.float32)
        ids = torch.arange(cfg.top_k, dtype=torch.int32).repeat(3, 1)
        if key == "ids" and rank == world - 1:
            ids[1, 2] = cfg.num_experts + 3
        backend = build(name, cfg, group, placement, **opts)
        try:
            backend.dispatch(x, Routing(ids, torch.ones(3, cfg.top_k)))
            results[key] = ""
        except ValueError as exc:
            results[key] = str(exc)
    # static shapes: a clean first call, then bad ids on one rank in a later eager call
    backend = build(name, CFG, group, placement, static_shapes=True, max_tokens_per_rank=3)
    x, ids = torch.randn(3, CFG.hidden), torch.arange(CFG.top_k, dtype=torch.int32).repeat(3, 1)
    d = backend.dispatch(x, Routing(ids, torch.ones(3, CFG.top_k)))
    backend.combine(torch.zeros(d.num_pairs, CFG.hidden), d)
    if rank == world - 1:
        ids[0, 0] = -5
    try:
        backend.dispatch(x, Routing(ids, torch.ones(3, CFG.top_k)))
        results["ids_static"] = ""
    except ValueError as exc:
        results["ids_static"] = str(exc)
    return results


def _world_checks(group) -> dict:
    world = group.world
    cases = [_run_case(group, c, n) for c in CASES for n in BACKENDS]
    bad = {n: _bad_inputs(group, n) for n in BACKENDS}
    # the group still works after the errors above: one more clean case
    after = _run_case(group, Case("after_errors", UNEVEN), "nccl_a2a") if world > 1 else None
    return {"cases": cases, "bad": bad, "after": after}


@lru_cache(maxsize=None)
def _gloo(world: int) -> tuple:
    return tuple(run_ranks(_world_checks, world, timeout=300))


def _check_cases(rows: list[dict], world: int) -> None:
    for r in rows:
        tag = f"W={world} {r['backend']} {r['case']} rank {r['rank']}"
        assert r["finite"], f"{tag}: non-finite output (an unwritten row or leaked padding)"
        assert r["err"] <= r["tol"], f"{tag}: rel err {r['err']:.3g} > {r['tol']}"
        assert r["format_err"] <= r["format_tol"], f"{tag}: rel err vs unquantized {r['format_err']:.3g}"
        assert r["bitwise_repeat"], f"{tag}: repeated runs differ"
        assert r["valid_pairs"] == r["pairs_expected"], f"{tag}: computed {r['valid_pairs']} pairs"
        assert r["counts_match"], f"{tag}: expert_counts disagree with expert_ids"
        case = next(c for c in CASES + [Case("after_errors", UNEVEN)] if c.name == r["case"])
        if not case.static:  # after a count exchange only the local pairs are handed over
            assert r["num_pairs"] == r["pairs_expected"], f"{tag}: {r['num_pairs']} pairs incl. padding"
        if r["backend"] == "nccl_a2a" and not case.static:
            # once per destination rank: exactly the rows whose token has an expert here
            assert r["rows_received"] == r["rows_expected"], f"{tag}: {r['rows_received']} rows"
        if r["backend"] == "allgather" and not case.static:
            tokens = r["tokens"]
            if case.gather != "auto":
                assert r["padded"] == (case.gather == "padded"), tag
            per_rank = max(tokens) if r["padded"] else tokens[r["rank"]]
            assert r["rows_received"] == (world * max(tokens) if r["padded"] else sum(tokens)), tag
            assert r["dispatch_bytes"] == (world - 1) * per_rank * r["row_bytes"], tag


@pytest.mark.parametrize("world", [2, 3, 4])
def test_backends_match_reference_over_gloo(world):
    results = _gloo(world)
    for per_rank in results:
        _check_cases(per_rank["cases"], world)
        if per_rank["after"] is not None:
            _check_cases([per_rank["after"]], world)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bad_inputs_raise_on_every_rank_naming_the_rank(world):
    expect = {"hidden": ("hidden", "rank 1: 48"), "config": ("config", "rank 0"),
              "payload": ("payload", f"rank {world - 1}: 1"), "ids": ("routing ids", f"[{world - 1}]"),
              "dtype": ("x dtype", "rank 0: 1"), "ids_static": ("routing ids", f"[{world - 1}]")}
    for per_rank in _gloo(world):
        for name, msgs in per_rank["bad"].items():
            for key, words in expect.items():
                for word in words:
                    assert word in msgs[key], f"{name} {key}: {msgs[key]!r} lacks {word!r}"


def test_virtual_ranks_match_gloo():
    for world in (3, 6, 8):
        per_rank = VirtualGroup(world, timeout=60).run(
            lambda g: [_run_case(g, c, n) for c in CASES for n in BACKENDS])
        for rows in per_rank:
            _check_cases(rows, world)


@pytest.mark.parametrize("name", BACKENDS)
def test_one_rank_without_a_group(name):
    rows = [_run_case(None, c, name) for c in CASES]
    _check_cases(rows, 1)


def _rank_static_bound(group, name: str) -> list[str]:
    """Static shapes with dispatch(max_tokens=B) on a workspace for 16 tokens: the same output as
    the unbounded call, from a B-row exchange (W * B * K pairs); unequal bounds raise on every
    rank naming the field; a bound below T or past the workspace raises."""
    case = Case("static_bound", UNEVEN)
    W, rank, errors = group.world, group.rank, []
    b = build(name, CFG, group, Placement.contiguous(CFG.num_experts, W), static_shapes=True, max_tokens_per_rank=16)
    x, ids, w = _inputs(case, rank, W)
    expert = _full(CFG).select(b.placement.global_ids(rank))

    def call(bound: int | None) -> tuple[torch.Tensor, int]:
        d = b.dispatch(x, Routing(ids, w), max_tokens=bound)
        return b.combine(reference_experts(d.hidden, d.row_ids, d.expert_ids, expert, CFG), d), d.num_pairs

    B = max(UNEVEN[:W])
    full, m_full = call(None)
    bounded, m_bounded = call(B)
    if not torch.equal(full, bounded) or m_bounded * 16 != m_full * B:
        errors.append(f"bounded call: pairs {m_bounded} vs {m_full}, equal {torch.equal(full, bounded)}")
    try:
        call(B + rank)  # ranks disagree
        errors.append("unequal bounds did not raise")
    except ValueError as exc:
        if "differ from rank 0 on max_tokens of the call" not in str(exc):
            errors.append(f"unexpected message: {exc}")
    for bad in (UNEVEN[rank] - 1, 17):
        try:
            call(bad)
            if bad >= 0:
                errors.append(f"max_tokens={bad} did not raise")
        except ValueError as exc:
            if "max_tokens_per_rank=16" not in str(exc):
                errors.append(f"unexpected message: {exc}")
    return errors


@pytest.mark.parametrize("name", BACKENDS)
def test_static_shapes_with_a_call_bound(name):
    for rank, errors in enumerate(run_ranks(_rank_static_bound, 3, args=(name,), timeout=120)):
        assert not errors, f"rank {rank}: {errors}"


@pytest.mark.parametrize("name", BACKENDS)
def test_static_shapes_over_the_bound_names_the_rank(name):
    def body(g):
        placement = Placement.contiguous(CFG.num_experts, g.world)
        b = build(name, CFG, g, placement, static_shapes=True, max_tokens_per_rank=4)
        assert not b.needs_host_sync
        T = 6 if g.rank == 1 else 2
        x, ids = torch.randn(T, CFG.hidden), torch.arange(CFG.top_k, dtype=torch.int32).repeat(T, 1)
        b.dispatch(x, Routing(ids, torch.ones(T, CFG.top_k)))

    # whichever thread's error is reported first, it names rank 1 and its reason (rank 0 raises
    # PeerFailedError quoting rank 1's check; rank 1 its own ValueError)
    with pytest.raises(VirtualGroupError,
                       match=r"virtual rank [01] failed.*rank 1.*T=6 exceeds max_tokens_per_rank=4"):
        VirtualGroup(2, timeout=5).run(body)


@pytest.mark.parametrize("name", BACKENDS)
def test_construction_errors(name):
    cls = get_comm(name)
    assert cls.needs_host_sync and cls.layouts == ("dp",)
    group = SimpleNamespace(rank=0, world=3)
    with pytest.raises(ValueError, match="not divisible by the EP world size 3"):
        MoELayer.from_global(CFG.replace(num_experts=10), _full(CFG.replace(num_experts=10)), group, comm=name)
    with pytest.raises(ValueError, match="placement covers 24 experts on 2 ranks"):
        build(name, CFG, group, Placement.contiguous(24, 2))
    with pytest.raises(ValueError, match="supported payloads: bf16, fp8, fp8_block, nvfp4"):
        build(name, CFG, group, Placement.contiguous(24, 3), payload="int4")
    with pytest.raises(ValueError, match="static_shapes needs max_tokens_per_rank"):
        build(name, CFG, group, Placement.contiguous(24, 3), static_shapes=True)
    with pytest.raises(ValueError, match="combine_dtype"):
        build(name, CFG, group, Placement.contiguous(24, 3), combine_dtype=torch.float16)
    with pytest.raises(ValueError, match="nvfp4 payloads need hidden % 16"):
        build(name, CFG.replace(hidden=40), group, Placement.contiguous(24, 3), payload="nvfp4")
    # options handed to several backends at once (comm="auto", benchmarks) reach this one; an
    # unknown key is named with the valid ones
    opts = {"max_tokens_per_rank": 8, "payload": "fp8", "combine_dtype": "bf16", "static_shapes": True, "x": 1}
    with pytest.raises(ValueError, match=rf"comm '{name}' has no option 'x'; its options: max_tokens_per_rank, "
                                         "payload, combine_dtype, static_shapes, input_scale"):
        cls.make_options(**opts)
    o = cls.make_options(**{k: v for k, v in opts.items() if k != "x"})
    assert (o.max_tokens_per_rank, o.payload, o.combine_dtype, o.static_shapes) == (8, "fp8", torch.bfloat16, True)
    if name == "allgather":
        with pytest.raises(ValueError, match="gather must be one of"):
            build(name, CFG, group, Placement.contiguous(24, 3), gather="ring")


def test_once_per_destination_rank_moves_fewer_bytes_than_once_per_expert():
    """Top-8 of 256 experts over 4 ranks: rows per token ~3.6, not 8 (the ~2.2x of the issue)."""
    cfg = CFG.replace(num_experts=256, top_k=8)
    case = replace(Case("bytes", (64, 64, 64, 64)), top_k=8)

    def body(g):
        p = Placement.contiguous(256, 4)
        b = build("nccl_a2a", cfg, g, p)
        gen = _gen(case, g.rank)
        ids = torch.rand(64, 256, generator=gen).argsort(dim=1)[:, :8].to(torch.int32)
        d = b.dispatch(torch.randn(64, cfg.hidden, generator=gen), Routing(ids, torch.ones(64, 8)))
        return d.hidden.shape[0]

    rows = sum(VirtualGroup(4).run(body))
    ratio = 4 * 64 * 8 / rows
    assert 2.0 < ratio < 2.4, ratio


def test_bench_comm_rows_and_bytes(monkeypatch):
    from epmoe.bench.comm import _inputs, bench_comm
    from epmoe.comm.symmetric import SymmA2A

    W, tokens, names = 2, [1, 6], BACKENDS + ("symm_a2a",)
    built = []
    init = SymmA2A.__init__

    @functools.wraps(init)
    def recording_init(self, cfg, group, placement, options=None, **kwargs):
        built.append(options.max_tokens_per_rank)
        init(self, cfg, group, placement, options, **kwargs)

    monkeypatch.setattr(SymmA2A, "__init__", recording_init)

    def body(g):
        return bench_comm(CFG, names, tokens, g, torch.float32, payload="fp8", iters=2, warmup=1, link_gbps=100.0)

    rows = VirtualGroup(W).run(body)[0]
    assert [(r["backend"], r["tokens"]) for r in rows] == [(n, t) for n in names for t in tokens]
    row_bytes = row_layout(CFG, "fp8", torch.float32).nbytes
    placement = Placement.contiguous(CFG.num_experts, W)
    kl = min(CFG.top_k, placement.local_experts)
    for r in rows:
        assert r["payload"] == "fp8" and r["dispatch_us"] > 0 and r["combine_us"] > 0, r
        assert r["timing"] == "cpu" and r["ranks"] == "threads"
        assert r["bytes_per_rank"] == r["dispatch_bytes"] + r["combine_bytes"]
        assert r["link_frac"] == pytest.approx(r["GB/s"] / 100.0)
        assert r["dispatch GB/s"] == pytest.approx(r["dispatch_bytes"] / (r["dispatch_us"] * 1e3))
        if r["backend"] == "allgather":  # every token to the one other rank, fp32 partials back
            assert r["dispatch_bytes"] == (W - 1) * r["tokens"] * row_bytes
            assert r["combine_bytes"] == (W - 1) * r["tokens"] * CFG.hidden * 4
        elif r["backend"] == "nccl_a2a":  # at most once per other rank
            assert r["dispatch_bytes"] <= (W - 1) * r["tokens"] * row_bytes
        else:  # symm_a2a: meta of every token + a row per token that picks the other rank (+ count, flag)
            want_d, want_c = [], []
            for rank in range(W):
                ids = _inputs(CFG, rank, r["tokens"], torch.device("cpu"), torch.float32)[1].ids
                hits = int((placement.expert_rank[ids.long()] == 1 - rank).any(dim=1).sum())
                want_d.append(r["tokens"] * kl * 8 + hits * (CFG.hidden + 4) + 8)
                want_c.append(hits * CFG.hidden * 4 + 4)
            assert (r["dispatch_bytes"], r["combine_bytes"]) == (max(want_d), max(want_c)), r
            assert r["dispatch_bytes"] > 0 and r["combine_bytes"] > 4
    assert sorted(built) == [1, 1, 6, 6]  # a workspace per token count, sized to it, on each rank


def test_auto_never_picks_a_backend_whose_workspace_is_too_small():
    """The default ladder sends T <= 512 to symm_a2a, whose default workspace holds 128 tokens:
    between 129 and 512 tokens auto must take the next backend, and that call must succeed."""
    from epmoe.select import DEFAULT_CROSSOVERS, comm_capacity, pick_comm

    ladder = [(512, "symm_a2a"), (None, "nccl_a2a")]
    assert ladder == DEFAULT_CROSSOVERS
    caps = {"symm_a2a": 128, "nccl_a2a": None, "allgather": 4096}
    cands = ["allgather", "nccl_a2a", "symm_a2a"]
    picks = [pick_comm(t, cands, ladder, capacities=caps) for t in (1, 128, 129, 512, 513, 5000)]
    assert picks == ["symm_a2a", "symm_a2a", "nccl_a2a", "nccl_a2a", "nccl_a2a", "nccl_a2a"]
    assert pick_comm(200, cands, ladder) == "symm_a2a"  # without capacities: the old behaviour
    # nothing fits: the largest workspace (its call raises the error naming the bound)
    assert pick_comm(300, ["symm_a2a", "allgather"], ladder, capacities={"symm_a2a": 128, "allgather": 256}) \
        == "allgather"
    # fallback along the ladder skips a candidate that cannot hold the call
    assert pick_comm(300, ["symm_a2a", "allgather"], [(None, "symm_a2a")], capacities=caps) == "allgather"

    def body(g):
        full = _full(CFG)
        layer = MoELayer.from_global(CFG, full, g, comm="auto")
        caps = {n: comm_capacity(c) for n, c in layer.comms.items()}
        out = {}
        for T in (128, 200):
            name = pick_comm(T, list(layer.comms), DEFAULT_CROSSOVERS, capacities=caps)
            b = layer.comms[name]
            x = torch.randn(T, CFG.hidden, generator=torch.Generator().manual_seed(T + g.rank))
            ids = torch.rand(T, CFG.num_experts, generator=torch.Generator().manual_seed(T)).argsort(1)[:, :CFG.top_k]
            d = b.dispatch(x, Routing(ids.to(torch.int32), torch.ones(T, CFG.top_k)))
            y = b.combine(torch.zeros(d.num_pairs, CFG.hidden), d)
            out[T] = (name, tuple(y.shape))
        return caps, out

    caps, out = VirtualGroup(2).run(body)[0]
    assert caps["symm_a2a"] == 128 and caps["nccl_a2a"] is None
    assert out == {128: ("symm_a2a", (128, CFG.hidden)), 200: ("nccl_a2a", (200, CFG.hidden))}


def test_auto_layer_forward_past_the_symm_workspace():
    """The layer itself passes the capacities: a 200-token forward under comm='auto' runs on
    nccl_a2a (symm_a2a holds 128) and equals the single-rank layer."""
    full = _full(CFG)

    def body(g):
        layer = MoELayer.from_global(CFG, full, g, comm="auto")
        gen = torch.Generator().manual_seed(3 + g.rank)
        x, logits = torch.randn(200, CFG.hidden, generator=gen), torch.randn(200, CFG.num_experts, generator=gen)
        y = layer(x, logits)
        ref = MoELayer(CFG, full)(x, logits)
        return layer.comm.name, float((y - ref).abs().max() / ref.abs().max())

    for name, err in VirtualGroup(2).run(body):
        assert name == "nccl_a2a" and err <= EXACT_TOL


def test_bench_comm_command_over_gloo_processes(tmp_path, capsys):
    """`epmoe bench comm` end to end on the CPU: gloo processes, every dp backend, real bytes."""
    from epmoe.cli import main

    out = tmp_path / "comm.json"
    assert main(["bench", "comm", "--preset", "olmoe-1b-7b", "--tokens", "0,3", "--world", "2", "--iters", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    # symm_a2a twice by default: its push combine (the backend's default) and the pull one
    assert [(r["backend"], r["tokens"]) for r in rows] == [
        (n, t) for n in ("allgather", "nccl_a2a", "symm_a2a", "symm_a2a pull") for t in (0, 3)]
    for r in rows:
        assert r["ranks"] == "gloo" and r["timing"] == "cpu" and r["payload"] == "float32", r
        if r["tokens"]:
            assert r["dispatch_bytes"] > 0 and r["combine_bytes"] > 0 and r["GB/s"] > 0, r
    assert "symm_a2a" in capsys.readouterr().out


def test_doctor_prints_symm_workspace_per_rank(capsys):
    """`epmoe doctor` lists the symm_a2a workspace of two presets at W = 8, Tm = 128 and 4096;
    the numbers must match the memory formula of comm/symmetric.py, evaluated here."""
    import re

    from epmoe.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for preset in ("deepseek-v3", "qwen3-30b-a3b"):
        cfg = MoEConfig.from_preset(preset)
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(preset + " (H="))
        W, H, Kl = 8, cfg.hidden, min(cfg.top_k, cfg.num_experts // 8)
        row = {"bf16": 2 * H, "fp8": H + 4, "nvfp4": H // 2 + H // 16 + 4}
        for tm in (128, 4096):
            for payload, d in row.items():
                mib = float(re.search(rf"Tm={tm} {payload} ([0-9.]+) MiB", line).group(1))
                formula = (12 * W + W * tm * (8 * Kl + d + 4 * H)) / 2**20
                assert formula - 0.05 <= mib <= formula + 0.05 + 7 * 128 / 2**20, (preset, tm, payload, mib, formula)
    assert re.search(r"deepseek-v3 .*Tm=128 bf16 42\.1 MiB", out)  # the docstring's example


def _fake_row(backend: str, tokens: int, us: float, payload: str = "bfloat16", ranks: str = "nccl") -> dict:
    return {"backend": backend, "payload": payload, "world": 4, "tokens": tokens, "ranks": ranks,
            "dispatch_us": us / 2, "combine_us": us / 2}


def test_store_crossovers_from_rows(tmp_path):
    """--store-crossovers: the fastest round trip per token count becomes the ladder that
    select.crossovers reads and pick_comm follows."""
    from epmoe.bench.comm import ladder_from_rows
    from epmoe.select import crossovers, pick_comm, write_crossovers

    times = {  # µs per round trip: symm wins to 128, nccl to 2048, allgather at 4096
        "symm_a2a": {1: 20, 8: 22, 128: 30, 512: 200, 2048: 900, 4096: 2100},
        "nccl_a2a": {1: 120, 8: 125, 128: 160, 512: 180, 2048: 800, 4096: 2000},
        "allgather": {1: 150, 8: 160, 128: 250, 512: 400, 2048: 850, 4096: 1900},
    }
    rows = [_fake_row(b, t, us) for b, per in times.items() for t, us in per.items()]
    rows += [_fake_row("nccl_a2a", 1, 1.0, payload="fp8"),  # another payload: ignored
             _fake_row("nccl_a2a static", 8, 1.0)]  # a static-shape variant: not a backend auto picks
    world, ladder = ladder_from_rows(rows)
    assert (world, ladder) == (4, [(128, "symm_a2a"), (2048, "nccl_a2a"), (None, "allgather")])
    path = tmp_path / "crossovers.json"
    path.write_text(json.dumps({"Other GPU": {"8": [[None, "nccl_a2a"]]}}))
    write_crossovers("NVIDIA H200", world, ladder, path)
    read, source = crossovers("NVIDIA H200", 4, path)
    assert read == ladder and "measured" in source
    assert crossovers("Other GPU", 8, path)[0] == [(None, "nccl_a2a")]  # other entries kept
    assert "defaults" in crossovers("NVIDIA H200", 8, path)[1]
    cands = sorted(times)
    for t in (1, 8, 128, 512, 2048, 4096):
        assert pick_comm(t, cands, read) == min(times, key=lambda b, t=t: times[b][t]), t
    with pytest.raises(ValueError, match="real ranks"):
        ladder_from_rows([_fake_row("symm_a2a", 1, 5.0, ranks="virtual")])
    with pytest.raises(ValueError, match="ends with"):
        write_crossovers("x", 2, [(128, "symm_a2a")], path)


def test_bench_comm_command_stores_crossovers(tmp_path, capsys):
    from epmoe.cli import main
    from epmoe.select import crossovers

    path = tmp_path / "crossovers.json"
    assert main(["bench", "comm", "--preset", "olmoe-1b-7b", "--tokens", "1,4", "--world", "2", "--iters", "2",
                 "--backend", "nccl_a2a,symm_a2a", "--store-crossovers", str(path)]) == 0
    ladder, source = crossovers("cpu", 2, path)
    assert "measured" in source and ladder[-1][0] is None
    assert {name for _, name in ladder} <= {"nccl_a2a", "symm_a2a"}
    assert f"-> {path}" in capsys.readouterr().out


STATIC_SCALE = {"fp8": 0.05, "nvfp4": 0.004}  # far from the batch amax scales (~0.007, ~0.001)


def _rank_static_scale(group, name: str, payload: str, scales: tuple[float, ...]) -> dict:
    from epmoe.quant import quantize_activations

    scale = scales[group.rank]
    placement = Placement.contiguous(CFG.num_experts, group.world)
    opts = {"payload": payload, "input_scale": scale, "max_tokens_per_rank": 8}
    full = _full(CFG)
    runner = ReferenceRunner(CFG, full.select(placement.global_ids(group.rank)))
    x, ids, w = _inputs(Case("static_scale", (6, 3, 0, 5)), group.rank, group.world)
    try:  # symm_a2a agrees at construction (device given), the others in the first call
        b = build(name, CFG, group, placement, **opts)
        d = b.dispatch(x, Routing(ids, w))
    except ValueError as exc:
        return {"error": str(exc)}
    y = b.combine(runner(d), d)
    rows = d.row_ids[d.expert_ids >= 0].long().unique()
    q = d.hidden
    got = (q.scales if payload == "fp8" else q.global_scale).reshape(q.data.shape[0], -1)[rows].float()
    xs = quantize_activations(x, payload, scale=torch.tensor(scale)).dequantize(torch.float32)
    ref = reference_output(xs, ids, w, full, CFG)
    ref_dynamic = reference_output(_dequantized(x, payload), ids, w, full, CFG)
    scale_of = max(ref.abs().max().item(), 1e-6) if ref.numel() else 1.0
    return {"error": "", "wire_scales": got.unique().tolist(), "err": (y - ref).abs().max().item() / scale_of
            if ref.numel() else 0.0, "err_dynamic": (y - ref_dynamic).abs().max().item() / scale_of
            if ref.numel() else 0.0}


@pytest.mark.parametrize("name", BACKENDS + ("symm_a2a",))
@pytest.mark.parametrize("payload", ["fp8", "nvfp4"])
def test_static_input_scale_quantizes_every_rank_alike(name, payload):
    """comm_options input_scale (the checkpoint's per-layer scale) reaches the wire encoder and
    the symm_a2a send: every row arrives with that scale, the output equals the reference on
    rows quantized with it (and not the one with each rank's dynamic scale)."""
    s = STATIC_SCALE[payload]
    for r in VirtualGroup(3).run(lambda g: _rank_static_scale(g, name, payload, (s,) * 3)):
        assert r["error"] == "", r
        assert r["wire_scales"] in ([], [pytest.approx(s)]), r
        assert r["err"] <= EXACT_TOL, r
    assert any(r["err_dynamic"] > 100 * EXACT_TOL for r in VirtualGroup(3).run(
        lambda g: _rank_static_scale(g, name, payload, (s,) * 3)))
    # one rank with another scale: every rank raises, naming it
    for r in VirtualGroup(3).run(lambda g: _rank_static_scale(g, name, payload, (s, s, 2 * s))):
        assert "input_scale" in r["error"] and "[2]" in r["error"], r


@pytest.mark.parametrize("name", BACKENDS + ("symm_a2a",))
def test_static_input_scale_rejected_where_it_has_no_meaning(name):
    p = Placement.contiguous(CFG.num_experts, 1)
    for payload in ("bf16", "fp8_block"):
        with pytest.raises(ValueError, match="input_scale is the static scale of fp8 / nvfp4"):
            build(name, CFG, None, p, payload=payload, input_scale=0.1)
    for bad in (0.0, float("nan"), -1.0, torch.ones(2)):
        with pytest.raises(ValueError, match="one finite value > 0"):
            build(name, CFG, None, p, payload="fp8", input_scale=bad)
