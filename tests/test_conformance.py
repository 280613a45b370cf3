"""One conformance suite for every registered comm backend and expert runner.

The test matrix is read off the registries (`epmoe.comm.COMM_BACKENDS`, `epmoe.experts.RUNNERS`)
and each class's declared capabilities, filtered by select.py's table (`check`): registering a
backend or runner puts it under every case below with no edit here.

Comm backends: every layout, payload and (where declared) static-shapes variant, at W = 1..4,
runs each `Case` through `MoELayer` (routed mode with `Routing.external`, and router logits; also
as two micro-batches, `forward_microbatches`) on gloo processes and on virtual ranks. Each rank's
output is compared with the single-rank reference layer (comm "none", runner "reference") fed the
same rows the wire delivers (the sender's quantize -> dequantize for quantized payloads), and
with the reference on the unquantized rows within the format's error. One launch per world size runs every case.
GPU (marked): the same cases in bf16 on one GPU, replayed from CUDA graphs where the combination
is graph-safe, and on NCCL ranks with several GPUs.

Expert runners: the same routing cases, as one rank's pair list (padding pairs interleaved,
reading a poisoned row), through each runner and weight format against the reference runner.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Routing, RoutingCapture, VirtualGroup, route
from epmoe.comm import COMM_BACKENDS
from epmoe.comm.base import Dispatched
from epmoe.experts import RUNNERS
from epmoe.quant import quantize_activations, quantize_weights
from epmoe.select import Combo, check, pick_runner
from tests.dist import run_ranks

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=24, top_k=4)
WORLDS = (1, 2, 3, 4)
MAX_TOKENS = 16  # max_tokens_per_rank of static-shape variants, and the largest graph bucket


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny matmuls in this process (virtual ranks, world 1, runners) on one intra-op thread, as
    the gloo ranks run: on a loaded 2-core machine two threads made the world-1 cases take 16 s
    instead of 0.6 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- declared capabilities ---------------------------------------------------------------------

# Fallbacks for capabilities a class does not declare yet (CONTRACT.md: every backend and runner
# declares them itself). TEMPORARY: delete this table and the getattr below once they all do.
_UNDECLARED = {"payloads": ("bf16",), "devices": ("cpu", "cuda"), "static_capable": False, "prepare": None}


def declared(cls: type, attr: str):
    """A class's declared capability `attr` (layouts, payloads, devices, static_capable, formats,
    prepare)."""
    return getattr(cls, attr, _UNDECLARED.get(attr))


# ---- cases ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One routing scenario. tokens: per rank (the first W are used; in the tp layout every rank
    holds all of them). routing: random | powerlaw | one_expert | one_rank (ids given, routed
    mode) or logits (router logits [T, E], the layer routes)."""

    id: str
    tokens: tuple[int, int, int, int]
    routing: str = "random"
    top_k: int = CFG.top_k

    def cfg(self) -> MoEConfig:
        return CFG.replace(top_k=self.top_k)


HOT_EXPERT = 13  # on rank 1 of 2 and of 3, rank 2 of 4: every rank sends to one remote expert
CASES = [
    Case("uneven", (5, 0, 3, 2)),
    Case("one_token", (1, 0, 1, 0)),
    Case("all_empty", (0, 0, 0, 0)),
    Case("powerlaw", (9, 4, 0, 7), routing="powerlaw"),
    Case("one_expert", (4, 3, 0, 2), routing="one_expert", top_k=1),
    Case("one_rank", (6, 2, 0, 5), routing="one_rank"),
    Case("logits", (5, 0, 3, 2), routing="logits"),
]


def _rank_inputs(case: Case, rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """x [T, H] fp32, ids [T, K] int64, weights [T, K] fp32, logits [T, E] fp32 (or None) of one
    rank's tokens."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{rank}".encode()))
    T, E, K = case.tokens[rank], CFG.num_experts, case.top_k
    x = torch.randn(T, CFG.hidden, generator=g)
    weights = torch.rand(T, K, generator=g) + 0.1
    logits = None
    if case.routing == "powerlaw":  # expert e drawn with probability ~ (e + 1)^-1.5
        pop = (torch.arange(E, dtype=torch.float32) + 1) ** -1.5
        ids = torch.multinomial(pop.expand(T, E), K, replacement=False, generator=g) if T else torch.zeros(0, K)
    elif case.routing == "one_expert":
        ids = torch.full((T, K), HOT_EXPERT)
    elif case.routing == "one_rank":  # every token's experts live on the last rank
        per = E // world
        ids = torch.rand(T, per, generator=g).argsort(dim=1)[:, :K] + per * (world - 1)
    else:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
        if case.routing == "logits":
            logits = torch.randn(T, E, generator=g)
    return x, ids.long(), weights, logits


def inputs(case: Case, rank: int, world: int, layout: str) -> tuple[torch.Tensor, ...]:
    """This rank's (x, ids, weights, logits); tp: every rank holds every rank's tokens."""
    if layout == "dp":
        return _rank_inputs(case, rank, world)
    parts = [_rank_inputs(case, r, world) for r in range(world)]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


@lru_cache(maxsize=None)
def full_weights() -> ExpertWeights:
    """All E experts, fp32 on the CPU (every rank slices its share)."""
    return ExpertWeights.random(CFG, CFG.num_experts, generator=torch.Generator().manual_seed(0))


def dequantized(x: torch.Tensor, payload: str) -> torch.Tensor:
    """What the receivers see of x [T, H]: the sender's quantize -> dequantize on x's device, the
    way the wire encoder quantizes (fp8_block through torch when H % 128 != 0), as fp32 on the
    CPU. On a GPU the device's quantizers are the ones to match: CUDA's fp8 rows differed from
    the CPU's quantization of the same bf16 rows (scale rounding, seen on an H200)."""
    if payload == "bf16" or x.shape[0] == 0:
        return x.float().cpu()
    backend = "torch" if payload == "fp8_block" and x.shape[1] % 128 else "auto"
    return quantize_activations(x, payload, backend=backend).dequantize(torch.float32).cpu()


# ---- tolerances: max |y - ref| / max |ref| -------------------------------------------------------

# Against the reference fed the rows the wire delivered (so quantization is not counted):
EXACT_TOL = {
    # fp32 end to end: only the summation order differs (per-rank partial sums, then rank order).
    torch.float32: 1e-5,
    # bf16 rows and weights on a GPU against the fp32 reference: inputs, weights and output each
    # rounded to 8 mantissa bits (2^-9); 2% of the largest output covers them over H = 32, I = 16.
    torch.bfloat16: 2e-2,
}
# Against the reference on the unquantized rows: what the payload format itself may cost.
# e4m3 keeps 3 mantissa bits (2^-4 relative per element); with H = 32, I = 16 and as few as one
# token little of it averages out: 15% (10% seen for one token). nvfp4 (e2m1, one scale per 16
# values) rounds up to 1/6 of a block's max per element, and H = 32 is only two blocks per row:
# 50% (35% seen with 3 tokens). bf16 payloads move the rows as they are: the exact bound.
FORMAT_TOL = {"fp8": 0.15, "fp8_block": 0.15, "nvfp4": 0.5}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return (y.float().cpu() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)


# ---- comm backends -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CommCombo:
    """One backend configuration at one world size."""

    backend: str
    layout: str
    payload: str
    static: bool
    world: int

    def __str__(self) -> str:
        return f"{self.backend}-{self.layout}-{self.payload}{'-static' if self.static else ''}-W{self.world}"

    def options(self) -> dict:
        """comm_options: only what differs from the backend's defaults."""
        opts: dict = {}
        if self.payload != "bf16":
            opts["payload"] = self.payload
        if self.static:
            opts.update(static_shapes=True, max_tokens_per_rank=MAX_TOKENS)
        return opts

    def runs(self, device: str, graph: bool = False) -> bool:
        """Whether select.py's table allows this combination (with the runner picked there)."""
        runner = pick_runner(device, "bf16")
        return check(Combo(comm=self.backend, runner=runner, payload=self.payload, layout=self.layout,
                           world=self.world, device=device, graph=graph, static_shapes=self.static))[0]


def comm_combos(device: str) -> list[CommCombo]:
    """Every registered backend x declared layout x payload x static variant x world that the
    table allows on `device` (E divisible by W)."""
    out = []
    for name in sorted(COMM_BACKENDS):
        cls = COMM_BACKENDS[name]
        if device not in declared(cls, "devices"):
            continue
        statics = (False, True) if declared(cls, "static_capable") else (False,)
        for layout in cls.layouts:
            for payload in declared(cls, "payloads"):
                for static in statics:
                    for world in WORLDS:
                        combo = CommCombo(name, layout, payload, static, world)
                        if CFG.num_experts % world == 0 and combo.runs(device):
                            out.append(combo)
    return out


COMM_COMBOS = comm_combos("cpu")


def _run_case(group, combo: CommCombo, case: Case, layers: dict, device: str, dtype: torch.dtype,
              graphs: bool) -> dict:
    """One case on this rank through the combo's layer (built once per top_k and mode)."""
    rank = group.rank if group is not None else 0
    world = group.world if group is not None else 1
    cfg, logits_mode = case.cfg(), case.routing == "logits"
    key = (case.top_k, logits_mode)
    if key not in layers:
        full = full_weights()
        on_dev = ExpertWeights(full.w13.to(device, dtype), full.w2.to(device, dtype))
        cap = RoutingCapture(4 * MAX_TOKENS, cfg.top_k, device)
        layer = MoELayer.from_global(cfg, on_dev, group, comm=combo.backend, layout=combo.layout,
                                     comm_options=combo.options(), capture=cap)
        if graphs:
            layer.capture_graphs(4 * MAX_TOKENS if combo.layout == "tp" else MAX_TOKENS, routed=not logits_mode)
        layers[key] = layer, cap
    layer, cap = layers[key]
    x, ids, w, logits = inputs(case, rank, world, combo.layout)
    xd = x.to(device, dtype)
    ref_cap = RoutingCapture(4 * MAX_TOKENS, cfg.top_k)
    ref_layer = MoELayer(cfg, full_weights(), comm="none", runner="reference", capture=ref_cap)
    xq = dequantized(xd, combo.payload)
    ys, same_ids = [], None
    for _ in range(2):  # twice: repeated runs must be bitwise equal
        if logits_mode:
            ys.append(layer(xd, logits.to(device)))
        else:  # int64 ids, converted once at the API edge
            ys.append(layer(xd, routing=Routing.external(ids.to(device), w.to(device), cfg.num_experts)))
    # two micro-batches through the split phases (run in turn where the backend has none)
    micro = (layer.forward_microbatches(xd, logits.to(device)) if logits_mode else layer.forward_microbatches(
        xd, routing=Routing.external(ids.to(device), w.to(device), cfg.num_experts)))
    if logits_mode:
        ref, ref_q = ref_layer(xd.float().cpu(), logits), ref_layer(xq, logits)
        same_ids = torch.equal(cap.captured().cpu(), ref_cap.captured())
    else:
        routing = Routing.external(ids, w, cfg.num_experts)
        ref, ref_q = ref_layer(xd.float().cpu(), routing=routing), ref_layer(xq, routing=routing)
    y = ys[0]
    return {
        "error": "",
        "shape": tuple(y.shape) == tuple(x.shape) and y.dtype == dtype,
        "finite": bool(torch.isfinite(y).all()),
        "repeat": torch.equal(ys[0], ys[1]),
        "same_ids": same_ids,
        "err": rel_err(y, ref_q),
        "format_err": rel_err(y, ref),
        "micro_err": rel_err(micro, ref),  # micro-batches quantize with their own batch scales
    }


def comm_rank(group, combos: tuple[CommCombo, ...], device: str = "cpu", dtype: torch.dtype = torch.float32,
              graphs: bool = False) -> dict[tuple[str, str], dict]:
    """Every case of every combo on this rank: (combo, case id) -> checks (or the error raised,
    so that one failing combo does not hide the others)."""
    out = {}
    for combo in combos:
        layers: dict = {}
        for case in CASES:
            try:
                out[str(combo), case.id] = _run_case(group, combo, case, layers, device, dtype, graphs)
            except Exception as exc:  # noqa: BLE001  (reported by the test that reads this case)
                out[str(combo), case.id] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def launch(ranks: str, world: int) -> dict[tuple[str, str], list[dict]]:
    """(combo, case id) -> per-rank checks of every CPU combo at `world`, from one launch."""
    combos = tuple(c for c in COMM_COMBOS if c.world == world)
    if ranks == "gloo":
        per_rank = run_ranks(comm_rank, world, args=(combos,), timeout=300)
    else:
        per_rank = VirtualGroup(world, timeout=60).run(lambda g: comm_rank(g, combos))
    return {key: [r[key] for r in per_rank] for key in per_rank[0]}


@pytest.fixture(scope="module")
def comm_results():
    """launch(ranks, world), run once per (ranks, world) and shared by that world's tests (the
    gloo processes themselves are the launcher's pool, shared with the other test files)."""
    done: dict[tuple[str, int], dict] = {}

    def get(ranks: str, world: int) -> dict[tuple[str, str], list[dict]]:
        if (ranks, world) not in done:
            done[ranks, world] = launch(ranks, world)
        return done[ranks, world]

    return get


def check_comm(results: list[dict], tag: str, payload: str, dtype: torch.dtype) -> None:
    tol = EXACT_TOL[dtype]
    format_tol = max(FORMAT_TOL.get(payload, 0.0), tol)
    for rank, r in enumerate(results):
        where = f"{tag} rank {rank}"
        assert not r["error"], f"{where}: {r['error']}"
        assert r["shape"], f"{where}: output shape or dtype differs from x"
        assert r["finite"], f"{where}: non-finite output (an unwritten row or leaked padding)"
        assert r["repeat"], f"{where}: repeated runs differ"
        assert r["same_ids"] in (None, True), f"{where}: captured ids differ from the single-rank layer"
        assert r["err"] <= tol, f"{where}: rel err {r['err']:.3g} > {tol} against the reference on the wire's rows"
        assert r["format_err"] <= format_tol, \
            f"{where}: rel err {r['format_err']:.3g} > {format_tol} against the unquantized reference"
        assert r["micro_err"] <= format_tol, \
            f"{where}: forward_microbatches rel err {r['micro_err']:.3g} > {format_tol} against the reference"


def test_every_registered_backend_is_in_the_matrix():
    """A backend that declares the CPU gets cases on it, with each layout and payload it declares
    (a capability the table rejects everywhere would otherwise drop it silently)."""
    for name in sorted(COMM_BACKENDS):
        cls = COMM_BACKENDS[name]
        if "cpu" in declared(cls, "devices"):
            mine = [c for c in COMM_COMBOS if c.backend == name]
            assert {c.layout for c in mine} == set(cls.layouts), name
            assert {c.payload for c in mine} == set(declared(cls, "payloads")), name
            assert {c.static for c in mine} == ({False, True} if declared(cls, "static_capable") else {False}), name
    assert {c.runner for c in RUNNER_COMBOS} == set(RUNNERS)


# Failures the suite found in the package, marked strict (a fix turns them into XPASS failures:
# then delete the entry): (fields that must all match, what is wrong). Fields: the combo's
# (backend, payload, static, world), the case id, and mode ("eager" or "graph").
KNOWN_BUGS: list[tuple[dict[str, object], str]] = []


def _known_bug(request, combo: CommCombo, case: Case, mode: str = "eager") -> None:
    fields = {"backend": combo.backend, "payload": combo.payload, "static": combo.static, "world": combo.world,
              "case": case.id, "mode": mode}
    for match, reason in KNOWN_BUGS:
        if all(fields[k] == v for k, v in match.items()):
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))


def _tag(combo: CommCombo, case: Case, ranks: str) -> str:
    return (f"comm {combo.backend} payload={combo.payload} layout={combo.layout}"
            f"{' static_shapes' if combo.static else ''} W={combo.world} case={case.id} ({ranks})")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("combo", COMM_COMBOS, ids=str)
@pytest.mark.parametrize("ranks", ["gloo", "virtual"])
def test_comm_backend_matches_reference(request, comm_results, ranks, combo, case):
    _known_bug(request, combo, case)
    check_comm(comm_results(ranks, combo.world)[str(combo), case.id], _tag(combo, case, ranks), combo.payload,
               torch.float32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("combo", [c for c in COMM_COMBOS if c.world == 1], ids=str)
def test_comm_backend_without_a_group_matches_reference(request, combo, case):
    """World 1 without any group object (group=None), as a single-GPU model runs the layer."""
    _known_bug(request, combo, case)
    result = comm_rank(None, (combo,))[str(combo), case.id]
    check_comm([result], _tag(combo, case, "no group"), combo.payload, torch.float32)


GPU_COMBOS = comm_combos("cuda")


def _gpu_modes(world: int) -> list[tuple[CommCombo, bool]]:
    """(combo, graphs) pairs on CUDA at `world`: eager always, graph replay where declared
    graph-safe (select.py's table with graph=True)."""
    out = []
    for combo in GPU_COMBOS:
        if combo.world == world:
            out.append((combo, False))
            if combo.runs("cuda", graph=True):
                out.append((combo, True))
    return out


@pytest.fixture(scope="module")
def gpu_results():
    """comm_rank's checks of one combo and mode on CUDA (one GPU, or NCCL ranks at W > 1), run
    once and shared by that combo's cases."""
    done: dict[tuple[str, bool], dict] = {}

    def get(combo: CommCombo, graphs: bool) -> dict[tuple[str, str], list[dict]]:
        if (str(combo), graphs) not in done:
            args = ((combo,), "cuda", torch.bfloat16, graphs)
            per_rank = ([comm_rank(None, *args)] if combo.world == 1
                        else run_ranks(comm_rank, combo.world, args=args, backend="nccl", timeout=300))
            done[str(combo), graphs] = {key: [r[key] for r in per_rank] for key in per_rank[0]}
        return done[str(combo), graphs]

    return get


def _mode_id(v) -> str:
    return ("graph" if v else "eager") if isinstance(v, bool) else str(v)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize(("combo", "graphs"), _gpu_modes(1), ids=_mode_id)
def test_comm_backend_on_gpu_matches_reference(request, gpu_results, combo, graphs, case):
    """bf16 on one GPU with the runner the table picks there, eager and replayed from CUDA graphs."""
    _known_bug(request, combo, case, "graph" if graphs else "eager")
    check_comm(gpu_results(combo, graphs)[str(combo), case.id],
               _tag(combo, case, "cuda graph" if graphs else "cuda"), combo.payload, torch.bfloat16)


@pytest.mark.multigpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize(("combo", "graphs"), _gpu_modes(2), ids=_mode_id)
def test_comm_backend_on_nccl_ranks_matches_reference(request, gpu_results, combo, graphs, case):
    """W = 2 on two GPUs (NCCL ranks), bf16, eager and replayed from CUDA graphs where graph-safe."""
    _known_bug(request, combo, case, "graph" if graphs else "eager")
    check_comm(gpu_results(combo, graphs)[str(combo), case.id],
               _tag(combo, case, "nccl graph" if graphs else "nccl"), combo.payload, torch.bfloat16)


# ---- expert runners ------------------------------------------------------------------------------

# Runner rows against the reference runner's, max |out - ref| / max |ref| over valid pairs.
# fp32: ieee dots, only the summation order differs. fp16: hidden and weights are exact in the
# reference too (it upcasts them); the error is the activation rounded to 10 mantissa bits before
# the down GEMM plus the output rounding. bf16 (GPU): the same with 7 bits.
RUNNER_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# fp8 / fp8_block weights: a runner may run w8a8 (activations rounded to e4m3 per token and 128
# values, as the fp8 tensor cores take them), which the weight-only reference does not: every
# hidden and activation value rounded to 3 mantissa bits (up to 2^-4 relative each), partly
# averaging out over the H and I terms.
W8A8_TOL = 0.1
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()


@dataclass(frozen=True)
class RunnerCombo:
    runner: str
    fmt: str
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.runner}-{self.fmt}-{str(self.dtype).removeprefix('torch.')}"

    def tol(self) -> float:
        return max(RUNNER_TOL[self.dtype], W8A8_TOL if self.fmt in ("fp8", "fp8_block") else 0.0)


# On the CPU every runner runs in fp32 and fp16. A runner that does not declare the CPU runs here
# only through the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py where no GPU is),
# which is how the triton runner is tested on the CPU; small shapes, the interpreter is slow.
RUNNER_COMBOS = [RunnerCombo(name, fmt, dtype) for name in sorted(RUNNERS) for fmt in RUNNERS[name].formats
                 for dtype in (torch.float32, torch.float16)]
GPU_RUNNER_COMBOS = [RunnerCombo(name, fmt, torch.bfloat16) for name in sorted(RUNNERS)
                     if "cuda" in declared(RUNNERS[name], "devices") for fmt in RUNNERS[name].formats]


@lru_cache(maxsize=None)
def format_weights(fmt: str, dtype: torch.dtype, device: str) -> ExpertWeights:
    """The shared weights in format `fmt` ("bf16": unquantized, in `dtype`) on `device`."""
    full = full_weights()
    if fmt == "bf16":
        return ExpertWeights(full.w13.to(device, dtype), full.w2.to(device, dtype))
    return ExpertWeights(*(quantize_weights(w, fmt).to(device) for w in (full.w13, full.w2)))


def make_runner(name: str, cfg: MoEConfig, weights: ExpertWeights):
    """A runner built as a layer builds it: its declared one-time weight transform, then the class."""
    cls = RUNNERS[name]
    prepare = declared(cls, "prepare")
    return cls(cfg, prepare(weights, cfg) if prepare is not None else weights)


def runner_dispatched(case: Case, dtype: torch.dtype, device: str) -> Dispatched:
    """The case's rank-0 tokens at W = 1 as a pair list: hidden [T + 1, H] whose last row is inf
    and read by no valid pair; 3 padding pairs (expert -1) interleaved, pointing at that row."""
    cfg = case.cfg()
    x, ids, _, logits = _rank_inputs(case, 0, 1)
    if logits is not None:
        ids = route(logits, cfg).ids
    T, K = ids.shape
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    expert_ids = torch.cat([ids.reshape(-1).int(), torch.full((3,), -1, dtype=torch.int32)])
    row_ids = torch.cat([torch.arange(T, dtype=torch.int32).repeat_interleave(K),
                         torch.full((3,), T, dtype=torch.int32)])
    order = torch.randperm(expert_ids.numel(), generator=g)
    expert_ids, row_ids = expert_ids[order], row_ids[order]
    hidden = torch.cat([x, torch.full((1, cfg.hidden), float("inf"))]).to(device, dtype)
    counts = torch.bincount(expert_ids[expert_ids >= 0].long(), minlength=cfg.num_experts).int()
    return Dispatched(hidden=hidden, row_ids=row_ids.to(device), expert_ids=expert_ids.to(device),
                      expert_counts=counts.to(device))


def check_runner(combo: RunnerCombo, case: Case, device: str) -> None:
    cfg = case.cfg()
    weights = format_weights(combo.fmt, combo.dtype, device)
    d = runner_dispatched(case, combo.dtype, device)
    out = torch.full((d.expert_ids.shape[0], cfg.hidden), float("nan"), dtype=combo.dtype, device=device)
    got = make_runner(combo.runner, cfg, weights)(d, out=out)
    ref = make_runner("reference", cfg, weights)(d)
    valid = (d.expert_ids >= 0).cpu()
    tag = f"runner {combo.runner} weights={combo.fmt} dtype={combo.dtype} case={case.id} ({device})"
    assert tuple(got.shape) == tuple(out.shape) and got.dtype == combo.dtype, f"{tag}: output {got.dtype} {got.shape}"
    got, ref = got.cpu()[valid], ref.cpu()[valid].float()
    assert torch.isfinite(got).all(), f"{tag}: a valid row is unwritten or read the poisoned row"
    err = rel_err(got, ref)
    assert err <= combo.tol(), f"{tag}: rel err {err:.3g} > {combo.tol()} against the reference runner"


# A runner sees one rank's pair list: cases that differ from the others only in where experts live
# (one_rank) or in how the ids were chosen (logits) give it nothing new at W = 1.
RUNNER_CASES = [c for c in CASES if c.routing not in ("one_rank", "logits")]


# w8a8 runners quantize every hidden row, the poisoned inf row too (inf / inf in its scale, a
# numpy warning under the interpreter); no valid pair reads that row.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", RUNNER_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("combo", RUNNER_COMBOS, ids=str)
def test_runner_matches_reference(combo, case):
    if "cpu" not in declared(RUNNERS[combo.runner], "devices") and not INTERPRETED:
        pytest.skip(f"runner {combo.runner!r} runs on the CPU only through the Triton interpreter")
    check_runner(combo, case, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("case", RUNNER_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("combo", GPU_RUNNER_COMBOS, ids=str)
def test_runner_on_gpu_matches_reference(combo, case):
    check_runner(combo, case, "cuda")
