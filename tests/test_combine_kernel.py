"""The local path's kernels (epmoe/kernels/combine.py) against their plain-torch twins, and the
combine `addend` of every comm backend.

CPU: the Triton kernels run through the interpreter (fp32 / fp16 outputs; the interpreter
cannot load bf16). GPU (marked): bf16 at model sizes. Every combine case poisons what the
kernel must not use: invalid pairs' output rows hold NaN / inf and their weights NaN, rows of
`out` no pair names hold NaN, and y starts as NaN so an unwritten row shows.
"""

from __future__ import annotations

import itertools
import threading
import zlib
from dataclasses import dataclass

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Placement, SharedExperts, VirtualGroup
from epmoe.comm import get_comm
from epmoe.comm.base import Dispatched
from epmoe.comm.none import NoComm
from epmoe.comm.wire import make_pairs, partial_sums
from epmoe.experts.reference import ReferenceRunner
from epmoe.kernels import combine as combine_kernels
from epmoe.ops.combine import (
    gather_sum,
    gather_sum_torch,
    local_dispatch,
    local_dispatch_torch,
    local_pairs,
    weighted_sum,
    weighted_sum_torch,
)
from epmoe.routing import Routing

# max |triton - twin| / max(|twin|, 1) per output dtype. Both sum the same fp32 products in the
# same k order, so fp32 agrees to rounding (the interpreter is bitwise equal; a GPU may fuse
# w * o + acc into one FMA, a rounding of at most 2^-24 per term: K = 8 terms -> ~5e-7). A
# half-precision output can then differ by one ulp where the fp32 sums straddle a rounding
# midpoint: 2^-10 (fp16), 2^-7 (bf16).
TOL = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ON_GPU = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    tokens: int
    top_k: int
    hidden: int
    y_dtype: torch.dtype = torch.float32
    out_dtype: torch.dtype = torch.float32  # the expert outputs' dtype
    addend: bool = False
    masked: str = "some"  # "some" | "none" | "all" pairs invalid

    @property
    def name(self) -> str:
        dt = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        return (f"T{self.tokens}_K{self.top_k}_H{self.hidden}_{dt[self.out_dtype]}to{dt[self.y_dtype]}"
                f"{'_addend' if self.addend else ''}_{self.masked}")


def _cases() -> list[Case]:
    """Every (T, K, H) of the grid; dtypes, addend and masking cycle through their combinations
    so that each appears with every T, K and H. T = 129 (many programs under the interpreter:
    slow) only for a few."""
    modes = list(itertools.product((torch.float32, torch.float16), (False, True), ("some", "none", "all")))
    cases = []
    for i, (T, K, H) in enumerate(itertools.product((0, 1, 3), (1, 2, 8), (32, 48, 80))):
        y_dtype, addend, masked = modes[i % len(modes)]
        cases.append(Case(T, K, H, y_dtype, torch.float16 if i % 4 == 3 else torch.float32, addend, masked))
    cases += [
        Case(129, 8, 80, torch.float16, torch.float32, addend=True),
        Case(129, 2, 48, torch.float32, torch.float16, masked="all"),
        Case(3, 8, 2880, torch.float32, torch.float32, addend=True),  # hidden of gpt-oss: 3 column tiles
    ]
    return cases


CASES = _cases()


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def _inputs(case: Case, device: str = "cpu"):
    """out [T*K, H] (invalid rows: NaN / inf), weights [T, K] (invalid: NaN), valid [T, K] bool,
    addend [T, H] fp32 or None."""
    T, K, H = case.tokens, case.top_k, case.hidden
    g = _gen(case.name)
    out = torch.randn(T * K, H, generator=g)
    weights = torch.rand(T, K, generator=g) + 0.1
    if case.masked == "some":
        valid = torch.rand(T, K, generator=g) > 0.35
    else:
        valid = torch.full((T, K), case.masked == "none")
    bad = ~valid.reshape(-1)
    out[bad] = float("nan")
    out[bad.nonzero().flatten()[::2]] = float("inf")
    weights[~valid] = float("nan")
    addend = torch.randn(T, H, generator=g) if case.addend else None
    out = out.to(case.out_dtype)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(out), move(weights), move(valid), move(addend)


def _compare(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, tag: str) -> None:
    assert torch.isfinite(y).all(), f"{tag}: non-finite output (padding leaked or a row left unwritten)"
    if y.numel():
        err = (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1.0)
        assert err <= TOL[dtype], f"{tag}: rel err {err:.3g} > {TOL[dtype]:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_weighted_sum_triton_matches_torch_twin(case: Case):
    out, weights, valid, addend = _inputs(case)
    T, K, H = case.tokens, case.top_k, case.hidden
    ref = weighted_sum_torch(out, weights, valid, T, K, addend=addend).to(case.y_dtype)
    # bool mask, then the pairs' int32 expert ids (-1 = invalid): the form comm "none" passes, then
    # ids with the invalid pairs past num_ids (routed ids out of range, as world-1 "none" passes them)
    ids = torch.where(valid, torch.randint(0, 7, (T, K), dtype=torch.int32, generator=_gen("ids")), -1)
    past = torch.where(valid, ids, torch.randint(7, 9, (T, K), dtype=torch.int32, generator=_gen("past")))
    for sel, num_ids in ((valid, None), (ids, None), (past, 7)):
        y = torch.full((T, H), float("nan"), dtype=case.y_dtype)
        got = weighted_sum(out, weights, sel, T, K, addend=addend, y=y, impl="triton", num_ids=num_ids)
        assert got is y
        _compare(y, ref, case.y_dtype, f"{case.name} sel={sel.dtype} num_ids={num_ids}")
        twin = weighted_sum_torch(out, weights, sel, T, K, addend=addend, num_ids=num_ids).to(case.y_dtype)
        _compare(twin, ref, case.y_dtype, f"{case.name} twin num_ids={num_ids}")
    if case.masked == "all":
        expect = addend if addend is not None else torch.zeros(T, H)
        assert torch.equal(y.float(), expect.to(case.y_dtype).float())
    # no y: a new fp32 tensor, as before the kernel existed
    got = weighted_sum(out, weights, valid, T, K, addend=addend, impl="triton")
    assert got.dtype == torch.float32 and got.shape == (T, H)
    _compare(got, weighted_sum_torch(out, weights, valid, T, K, addend=addend), torch.float32, case.name)


@pytest.mark.parametrize("case", CASES[:27:3] + CASES[27:], ids=lambda c: c.name)
def test_gather_sum_triton_matches_torch_twin(case: Case):
    """The pair form: out rows in an arbitrary order, some rows named by no pair (NaN)."""
    T, K, H = case.tokens, case.top_k, case.hidden
    dense, w_dense, valid, addend = _inputs(case)
    g = _gen(case.name + "/gather")
    M = int(valid.sum())
    spare = 5  # rows no pair names
    perm = torch.randperm(M + spare, generator=g)
    rows = torch.full((T, K), -1, dtype=torch.int32)
    rows[valid] = perm[:M].to(torch.int32)
    out = torch.full((M + spare, H), float("nan"), dtype=case.out_dtype)
    out[perm[:M]] = dense[valid.reshape(-1)]
    weights = torch.full((M + spare,), float("nan"))
    weights[perm[:M]] = w_dense[valid]
    y = torch.full((T, H), float("nan"), dtype=case.y_dtype)
    gather_sum(out, weights, rows, addend=addend, y=y, impl="triton")
    ref = gather_sum_torch(out, weights, rows, addend=addend)
    _compare(y, ref.to(case.y_dtype), case.y_dtype, case.name)
    # the same sums as the dense form (same products, same k order)
    _compare(ref, weighted_sum_torch(dense, w_dense, valid, T, K, addend=addend), torch.float32, case.name)


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 7, 33])
def test_partial_sums_kernel_matches_torch(compact: bool, rows: int):
    """Both wire pair forms (dense: static shapes; compact: after a count exchange) through the
    kernel and through the twin; compact runner outputs hold only local pairs."""
    K, H = 4, 40
    g = _gen(f"partial/{compact}/{rows}")
    local = torch.randint(-1, 3, (rows, K), dtype=torch.int32, generator=g)
    local[::3] = -1  # rows with no local pair
    weights = torch.where(local >= 0, torch.rand(rows, K, generator=g), float("nan"))
    pairs = make_pairs(local, weights, compact=compact)
    out = torch.randn(pairs.expert_ids.shape[0], H, generator=g)
    out[pairs.expert_ids < 0] = float("nan")
    got = partial_sums(out, pairs, H, impl="triton")
    ref = partial_sums(out, pairs, H, impl="torch")
    assert got.shape == (rows, H) and torch.isfinite(got).all()
    assert torch.equal(got, ref)
    if compact:  # an independent loop over the pairs, k-major as make_pairs lists them
        expect, p = torch.zeros(rows, H), 0
        for k in range(K):
            for r in range(rows):
                if local[r, k] >= 0:
                    expect[r] += weights[r, k] * out[p]
                    p += 1
        assert torch.equal(ref, expect)


def test_weighted_sum_checks_name_the_fix(monkeypatch):
    T, K, H = 2, 3, 16
    out, w, valid = torch.randn(T * K, H), torch.rand(T, K), torch.ones(T, K, dtype=torch.bool)
    bad = {
        "weights must be fp32": dict(weights=w.double()),
        "valid must be a": dict(valid=valid.float()),
        "out must be the expert outputs": dict(out=torch.randn(T * K + 1, H)),
        "out needs unit stride": dict(out=torch.randn(H, T * K).T),
        "addend must be fp32": dict(addend=torch.randn(T, H, dtype=torch.float16)),
        "addend must be": dict(addend=torch.randn(T, H + 1)),
        "y must be fp32, bf16 or fp16": dict(y=torch.zeros(T, H, dtype=torch.int32)),
        "y needs unit stride": dict(y=torch.zeros(H, T).T),
    }
    for words, kw in bad.items():
        args = {"out": out, "weights": w, "valid": valid} | kw
        with pytest.raises(ValueError, match=words):
            weighted_sum(args.pop("out"), args.pop("weights"), args.pop("valid"), T, K, impl="torch", **args)
    with pytest.raises(ValueError, match="impl must be one of"):
        weighted_sum(out, w, valid, T, K, impl="cuda")
    with pytest.raises(ValueError, match="rows must be int32"):
        gather_sum(out, torch.rand(T * K), valid)
    with pytest.raises(ValueError, match="weights must be fp32 \\[6\\]"):
        gather_sum(out, w, torch.zeros(T, K, dtype=torch.int32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="use impl='auto' or 'torch' on the CPU"):
        weighted_sum(out, w, valid, T, K, impl="triton")


# ---------------------------------------------------------------------------------------
# comm "none": dispatch
# ---------------------------------------------------------------------------------------


def _loop_pairs(ids: torch.Tensor, placement: Placement, rank: int) -> list[int]:
    """Local expert of every pair with plain loops: -1 for masked, out of range or remote ids."""
    E, res = placement.num_experts, []
    for g in ids.reshape(-1).tolist():
        ok = 0 <= g < E and int(placement.expert_rank[g]) == rank
        res.append(int(placement.expert_local[g]) if ok else -1)
    return res


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (2, 1), (3, 2), (8, 5)])
@pytest.mark.parametrize(("tokens", "top_k"), [(0, 4), (1, 8), (5, 3), (200, 8)])  # 1600 pairs: several programs
def test_local_dispatch_matches_twin_and_masks_bad_ids(world: int, rank: int, tokens: int, top_k: int):
    E = 24
    placement = Placement.contiguous(E, world)
    g = _gen(f"dispatch/{world}/{tokens}")
    ids = torch.randint(0, E, (tokens, top_k), dtype=torch.int32, generator=g)
    if tokens:  # masked (-1), negative and past-E ids, and one padding row of -1s
        flat = ids.view(-1)
        flat[::5] = -1
        flat[1::7] = E
        flat[2::11] = E + 9
        flat[3::13] = -4
        ids[-1] = -1
    got = local_dispatch(ids, placement, rank, impl="triton")
    ref = local_dispatch_torch(ids, placement, rank)
    assert torch.equal(got.expert_ids, ref.expert_ids)
    assert torch.equal(got.row_ids, ref.row_ids)
    assert torch.equal(got.counts, ref.counts)
    assert got.expert_ids.tolist() == _loop_pairs(ids, placement, rank)
    assert got.row_ids.tolist() == [p // top_k for p in range(tokens * top_k)]
    local = got.expert_ids
    assert got.counts.tolist() == [int((local == e).sum()) for e in range(placement.local_experts)]
    assert local_pairs(ids, placement, rank).view(-1).tolist() == _loop_pairs(ids, placement, rank)


def test_none_rejects_unknown_impl():
    cfg = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="impl must be one of"):
        NoComm(cfg, None, Placement.contiguous(8, 1), NoComm.make_options(impl="gpu"), device="cpu",
               dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# the combine addend, every backend
# ---------------------------------------------------------------------------------------

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=3)


def _addend_check(group, name: str, options: dict, tokens: int) -> list[str]:
    """On this rank: combine(addend=a) equals combine into fp32, + a, cast (bitwise: the same fp32
    sum, one add, one cast), with and without `out`, fp32 and fp16 outputs; a bad addend raises.
    Returns the failures."""
    rank = group.rank if group is not None else 0
    world = group.world if group is not None else 1
    g = _gen(f"addend/{name}" if name == "none" else f"addend/{name}/{rank}")  # none (tp): same tokens
    full = ExpertWeights.random(CFG, CFG.num_experts, generator=torch.Generator().manual_seed(0))
    placement = Placement.contiguous(CFG.num_experts, world)
    runner = ReferenceRunner(CFG, full.select(placement.global_ids(rank)))
    cls = get_comm(name)
    backend = cls(CFG, group, placement, cls.make_options(**options), device="cpu", dtype=torch.float32)
    x = torch.randn(tokens, CFG.hidden, generator=g)
    ids = torch.rand(tokens, CFG.num_experts, generator=g).argsort(dim=1)[:, : CFG.top_k].to(torch.int32)
    if tokens:
        ids[0, 1] = -1  # a masked pair
    routing = Routing(ids, torch.rand(tokens, CFG.top_k, generator=g))
    addend = torch.randn(tokens, CFG.hidden, generator=g)
    tag = f"{name} {options} rank {rank}"
    failures = []

    def call(**kw):
        d = backend.dispatch(x, routing)
        return backend.combine(runner(d), d, **kw)

    expect = call(out=torch.full((tokens, CFG.hidden), float("nan"))) + addend  # fp32 sum, + addend
    for dtype in (torch.float32, torch.float16):
        y = call(out=torch.full((tokens, CFG.hidden), float("nan"), dtype=dtype), addend=addend)
        if not torch.equal(y, expect.to(dtype)):
            failures.append(f"{tag}: out {dtype} differs")
    y = call(addend=addend)  # no out: x's dtype
    if y.dtype != x.dtype or not torch.equal(y, expect):
        failures.append(f"{tag}: no out differs")
    d = backend.dispatch(x, routing)
    out = runner(d)
    try:
        backend.combine(out, d, addend=addend[:, :-1])
        failures.append(f"{tag}: a bad addend was accepted")
    except ValueError as exc:
        if "addend must be" not in str(exc):
            failures.append(f"{tag}: bad addend message {exc}")
        if name == "symm_a2a":  # it checks before waiting: the call is still open, finish it
            backend.combine_recv(d)
    return failures


ADDEND_BACKENDS = [
    ("none", {"impl": "torch"}),
    ("none", {"impl": "triton"}),
    ("allgather", {}),
    ("allgather", {"static_shapes": True, "max_tokens_per_rank": 6}),
    ("nccl_a2a", {}),
    ("nccl_a2a", {"static_shapes": True, "max_tokens_per_rank": 6}),
    ("symm_a2a", {"max_tokens_per_rank": 6}),
]


class _OneAtATime:
    """A Triton kernel whose launches hold a lock: the interpreter patches triton.language while a
    kernel runs, so virtual ranks (threads) must not interpret two kernels at once."""

    lock = threading.Lock()

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with self.lock:
                return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize(("name", "options"), ADDEND_BACKENDS, ids=lambda v: v if isinstance(v, str) else str(v))
@pytest.mark.parametrize("world", [1, 2])
def test_combine_addend_every_backend(name: str, options: dict, world: int, monkeypatch):
    """W = 1 without a group (symm_a2a: one virtual rank), W = 2 on virtual ranks (none: the tp
    layout, every rank the same 4 tokens; the others: 5 tokens and 0)."""
    for kernel in ("local_pairs_kernel", "weighted_sum_kernel"):
        monkeypatch.setattr(combine_kernels, kernel, _OneAtATime(getattr(combine_kernels, kernel)))
    tokens = [4, 4] if name == "none" else [5, 0]
    if world == 1 and name != "symm_a2a":
        assert _addend_check(None, name, options, tokens[0]) == []
        return
    per_rank = VirtualGroup(world, timeout=60).run(lambda gr: _addend_check(gr, name, options, tokens[gr.rank]))
    assert [f for fs in per_rank for f in fs] == []


def _shared_layer_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: str):
    """A DeepSeek-V3-shaped layer (grouped sigmoid routing, one shared expert): the MoELayer
    arguments and (x, logits)."""
    cfg = MoEConfig.from_preset("deepseek-v3").scaled(hidden=hidden, intermediate=hidden // 2, num_experts=16)
    cfg = cfg.replace(n_group=4, topk_group=2)
    g = torch.Generator().manual_seed(3)
    weights = ExpertWeights.random(cfg, cfg.num_experts, dtype, device, generator=g)
    shared = SharedExperts.random(cfg, dtype, device, generator=g)
    bias = (torch.randn(cfg.num_experts, generator=g) * 0.1).to(device)
    x = torch.randn(tokens, cfg.hidden, generator=g).to(device, dtype)
    logits = torch.randn(tokens, cfg.num_experts, generator=g).to(device)
    return (cfg, weights), {"shared": shared, "correction_bias": bias}, (x, logits)


def test_layer_shared_experts_through_the_combine_kernel():
    """MoELayer with shared experts, comm "none" with the Triton kernels (interpreter) against the
    torch twins: the shared output is added in the combine launch, before the one cast."""
    args, kwargs, inputs = _shared_layer_inputs(7, 48, torch.float32, "cpu")
    ys = [MoELayer(*args, comm_options={"impl": impl}, **kwargs)(*inputs) for impl in ("torch", "triton")]
    assert torch.equal(ys[0], ys[1])



@pytest.mark.parametrize("tokens", [0, 1, 5, 700])
def test_world1_none_kernel_path_dispatch_launches_nothing(tokens):
    """One rank, kernel path: dispatch hands the routing ids and a kept row table (no launch, no
    counts); routed ids past E (an unchecked call) are skipped, as the mapping kernel skipped them;
    the layer equals the torch twins' layer; outgrown row tables stay alive."""
    cfg = MoEConfig(hidden=32, intermediate=16, num_experts=6, top_k=2)
    w = ExpertWeights.random(cfg, 6, generator=torch.Generator().manual_seed(3))
    comm = NoComm(cfg, None, Placement.contiguous(6, 1), NoComm.Options(impl="triton"), device="cpu",
                  dtype=torch.float32)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)] or [torch.zeros(0, 2)])
    ids = ids.int().reshape(tokens, 2)
    weights = torch.rand(tokens, 2, generator=g)
    if tokens:
        ids[0, 1] = 9  # past E: no expert computes the pair and combine leaves it out
    d = comm.dispatch(x, Routing(ids, weights))
    assert d.expert_counts is None and torch.equal(d.expert_ids, ids.reshape(-1))
    assert torch.equal(d.row_ids, torch.arange(tokens * 2, dtype=torch.int32) // 2)
    out = ReferenceRunner(cfg, w)(Dispatched(x, d.row_ids, d.expert_ids.clamp(max=5), None))
    y = comm.combine(out, d)
    keep = (ids < 6).float()
    want = (out.view(tokens, 2, 32) * (weights * keep).unsqueeze(-1)).sum(1)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    tables = comm._rows[(2, torch.device("cpu"))]
    assert tables[-1].numel() >= 2 * tokens
    layers = [MoELayer(cfg, w, comm_options={"impl": impl}, validate=False) for impl in ("torch", "triton")]
    valid = ids.clamp(max=5)
    if tokens:
        valid[0, 1] = 5 if valid[0, 0] != 5 else 4
    r = Routing(valid, weights)
    torch.testing.assert_close(layers[1](x, routing=r), layers[0](x, routing=r), rtol=1e-6, atol=1e-6)

# ---------------------------------------------------------------------------------------
# GPU: bf16
# ---------------------------------------------------------------------------------------

GPU_CASES = [
    Case(1, 8, 2048, torch.bfloat16, torch.bfloat16, addend=True),
    Case(4096, 8, 2048, torch.bfloat16, torch.bfloat16, addend=True),
    Case(129, 4, 2880, torch.bfloat16, torch.bfloat16),
    Case(33, 8, 7168, torch.float32, torch.bfloat16, addend=True, masked="none"),
    Case(5, 2, 80, torch.float16, torch.bfloat16, masked="all"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_combine_kernels_bf16_on_gpu(case: Case):
    T, K, H = case.tokens, case.top_k, case.hidden
    out, weights, valid, addend = _inputs(case, "cuda")
    y = torch.full((T, H), float("nan"), dtype=case.y_dtype, device="cuda")
    weighted_sum(out, weights, valid, T, K, addend=addend, y=y)  # auto: Triton on CUDA
    ref = weighted_sum_torch(out, weights, valid, T, K, addend=addend).to(case.y_dtype)
    _compare(y, ref, case.y_dtype, case.name)
    again = torch.full_like(y, float("nan"))
    weighted_sum(out, weights, valid, T, K, addend=addend, y=again)
    assert torch.equal(y, again), "repeated runs must be bitwise equal"
    placement = Placement.contiguous(256, 4).to("cuda")
    ids = torch.randint(-1, 260, (T, K), dtype=torch.int32, device="cuda")
    for rank in range(4):
        a, b = local_dispatch(ids, placement, rank), local_dispatch_torch(ids, placement, rank)
        assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.row_ids, b.row_ids)
        assert torch.equal(a.counts, b.counts)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_none_layer_bf16_on_gpu_kernels_match_torch(tokens: int):
    args, kwargs, inputs = _shared_layer_inputs(tokens, 256, torch.bfloat16, "cuda")
    ys = [MoELayer(*args, comm_options={"impl": impl}, **kwargs)(*inputs) for impl in ("torch", "triton")]
    _compare(ys[1], ys[0], torch.bfloat16, f"T={tokens}")
