"""Split phases (`dispatch_start` / `combine_start` + `wait()`) and `MoELayer.forward_microbatches`.

On gloo processes and virtual ranks at W = 2 and 3, for each split-phase backend and payload:
- start + wait equals the blocking call bit for bit (expert outputs and combine's result, with
  an addend into a NaN-filled `out`);
- two calls' halves interleaved (both dispatches posted, then waits, combines waited in reverse)
  equal the two calls run one after the other; a backend holding one call in flight (symm_a2a)
  refuses the second start on every rank instead, and finishes the first call unharmed;
- forward_microbatches (2 and 3 micro-batches, with shared experts) equals forward bit for bit;
- a rank failing its checks in a split call raises, and every peer raises PeerFailedError.
One launch per (ranks, world) runs every case; results are cached for the tests that read them.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from functools import lru_cache

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer, Placement, Routing, VirtualGroup
from epmoe.comm import COMM_BACKENDS
from epmoe.comm.base import Dispatched
from epmoe.experts.reference import reference_experts
from epmoe.layer import SharedExperts
from tests.dist import run_ranks

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=24, top_k=4, shared_experts=1)
WORLDS = (2, 3)
HOT_EXPERT = 13


@dataclass(frozen=True)
class Case:
    """tokens: per rank (the first W are used); routing: random, or one_expert (top-1, every token
    to HOT_EXPERT, on rank 1)."""

    id: str
    tokens: tuple[int, int, int]
    routing: str = "random"

    @property
    def cfg(self) -> MoEConfig:
        return CFG.replace(top_k=1) if self.routing == "one_expert" else CFG


CASES = [
    Case("uneven", (5, 0, 3)),
    Case("one_token", (1, 0, 1)),
    Case("all_empty", (0, 0, 0)),
    Case("one_expert", (4, 3, 2), routing="one_expert"),
    Case("larger", (13, 7, 9)),
]


@dataclass(frozen=True)
class Combo:
    """A split-phase backend and its options. exact_micro: the payload's scales are per token or
    static, so micro-batches move the same bytes per token as the whole batch."""

    backend: str
    payload: str = "bf16"
    static: bool = False
    input_scale: float | None = None

    def __str__(self) -> str:
        scale = f"-scale{self.input_scale}" if self.input_scale is not None else ""
        return f"{self.backend}-{self.payload}{'-static' if self.static else ''}{scale}"

    def options(self) -> dict:
        opts: dict = {"payload": self.payload}
        if self.static:
            opts.update(static_shapes=True, max_tokens_per_rank=16)
        if self.input_scale is not None:
            opts["input_scale"] = self.input_scale
        return opts

    @property
    def exact_micro(self) -> bool:
        return self.payload in ("bf16", "fp8_block") or self.input_scale is not None


SPLIT_BACKENDS = sorted(n for n in COMM_BACKENDS if COMM_BACKENDS[n].split_phase and COMM_BACKENDS[n].moves_tokens)
COMBOS = [Combo(n, p) for n in SPLIT_BACKENDS for p in ("bf16", "fp8")] + [
    Combo(n, "fp8", input_scale=0.05) for n in SPLIT_BACKENDS] + [
    Combo(n, static=True) for n in SPLIT_BACKENDS if COMM_BACKENDS[n].static_capable]
# backends with a per-call agreement (symm_a2a has none: a peer of a failing rank times out instead)
FAILURE_COMBOS = COMBOS[:2] + COMBOS[-1:]


@lru_cache(maxsize=None)
def all_weights() -> tuple[ExpertWeights, SharedExperts]:
    g = torch.Generator().manual_seed(0)
    return ExpertWeights.random(CFG, CFG.num_experts, generator=g), SharedExperts.random(CFG, generator=g)


def rank_inputs(case: Case, rank: int, salt: str = "") -> tuple[torch.Tensor, Routing, torch.Tensor]:
    """x [T, H], its routing and router logits [T, E] of one rank."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{case.id}/{rank}/{salt}".encode()))
    T, E, K = case.tokens[rank], CFG.num_experts, case.cfg.top_k
    x = torch.randn(T, CFG.hidden, generator=g)
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    logits = torch.randn(T, E, generator=g)
    if case.routing == "one_expert":
        ids[:] = HOT_EXPERT
        logits[:, HOT_EXPERT] += 100
    return x, Routing(ids.int(), torch.rand(T, K, generator=g) + 0.1), logits


def one_row_at_a_time(weights: ExpertWeights, cfg: MoEConfig):
    """The reference runner computing each pair alone: its rows never depend on the batch (MKL's
    GEMM rows do: rows of a 1..5-row product differed from the same rows in a 40-row one)."""

    def run(d: Dispatched, out: torch.Tensor | None = None) -> torch.Tensor:
        M = d.expert_ids.shape[0]
        rows = [reference_experts(d.hidden, d.row_ids[i : i + 1], d.expert_ids[i : i + 1], weights, cfg)
                for i in range(M)]
        y = torch.cat(rows) if rows else reference_experts(d.hidden, d.row_ids, d.expert_ids, weights, cfg)
        return y if out is None else out.copy_(y)

    return run


def backend(group, combo: Combo, cfg: MoEConfig = CFG):
    """The combo's backend on this rank, and the one-row runner over this rank's experts."""
    placement = Placement.contiguous(cfg.num_experts, group.world)
    comm = COMM_BACKENDS[combo.backend](cfg, group, placement, COMM_BACKENDS[combo.backend].make_options(
        **combo.options()), device="cpu", dtype=torch.float32)
    local = all_weights()[0].select(placement.global_ids(group.rank))
    return comm, one_row_at_a_time(local, cfg)


def layer_of(group, combo: Combo, cfg: MoEConfig = CFG) -> MoELayer:
    """The combo's layer with shared experts, running the one-row runner."""
    weights, shared = all_weights()
    layer = MoELayer.from_global(cfg, weights, group, comm=combo.backend, comm_options=combo.options(),
                                 shared=shared)
    layer.runner = one_row_at_a_time(layer.runner.weights, cfg)
    return layer


def blocking(comm, runner, x, routing, addend=None):
    d = comm.dispatch(x, routing)
    out = runner(d)
    return out, comm.combine(out, d, addend=addend)


def check_halves(group, combo: Combo, case: Case) -> dict:
    """start + wait against the blocking calls; two calls interleaved against them in turn."""
    comm, runner = backend(group, combo, case.cfg)
    x, routing, _ = rank_inputs(case, group.rank)
    x2, routing2, _ = rank_inputs(case, group.rank, "second")
    addend = torch.randn(x.shape[0], CFG.hidden, generator=torch.Generator().manual_seed(group.rank))
    out, y = blocking(comm, runner, x, routing, addend)
    out2, y2 = blocking(comm, runner, x2, routing2)

    d = comm.dispatch_start(x, routing).wait()
    s_out = runner(d)
    into = torch.full_like(x, float("nan"))
    s_y = comm.combine_start(s_out, d, into, addend=addend).wait()

    if comm.calls_in_flight == 1:  # one workspace: a second start is refused, the first call goes on
        p1 = comm.dispatch_start(x, routing)
        try:
            comm.dispatch_start(x2, routing2)
            refused = False
        except RuntimeError as exc:
            refused = "one call in flight" in str(exc)
        d1 = p1.wait()
        i_y1 = comm.combine_start(runner(d1), d1, addend=addend).wait()
        return {"start_wait": torch.equal(s_out, out) and torch.equal(s_y, y) and s_y.data_ptr() == into.data_ptr(),
                "interleaved": refused and torch.equal(i_y1, y), "finite": bool(torch.isfinite(y).all())}
    p1, p2 = comm.dispatch_start(x, routing), comm.dispatch_start(x2, routing2)  # both posted
    d1 = p1.wait()
    q1 = comm.combine_start(runner(d1), d1, addend=addend)
    d2 = p2.wait()
    q2 = comm.combine_start(runner(d2), d2)
    i_y2, i_y1 = q2.wait(), q1.wait()  # waits in either order
    return {"start_wait": torch.equal(s_out, out) and torch.equal(s_y, y) and s_y.data_ptr() == into.data_ptr(),
            "interleaved": torch.equal(i_y1, y) and torch.equal(i_y2, y2), "finite": bool(torch.isfinite(y).all())}


def check_microbatches(group, combo: Combo, case: Case) -> dict:
    """forward_microbatches (2 and 3 splits, logits and routed, with shared experts) against forward."""
    layer = layer_of(group, combo, case.cfg)
    x, routing, logits = rank_inputs(case, group.rank)
    y, y_routed = layer(x, logits), layer(x, routing=routing)
    return {"micro2": torch.equal(layer.forward_microbatches(x, logits), y),
            "micro3": torch.equal(layer.forward_microbatches(x, logits, splits=3), y),
            "micro_routed": torch.equal(layer.forward_microbatches(x, routing=routing), y_routed)}


def check_failures(group, combo: Combo) -> dict:
    """The last rank fails its own checks: in dispatch_start (fp64 x), and in
    forward_microbatches (NaN logits; then splits=0). -> the error type each rank raised."""
    comm, _ = backend(group, combo)
    bad = group.rank == group.world - 1
    x, routing, logits = rank_inputs(CASES[-1], group.rank)  # every rank holds tokens
    layer = layer_of(group, combo)
    raised = {}
    for what, call in [
        ("dispatch_start", lambda: comm.dispatch_start(x.double() if bad else x, routing)),  # fp64: refused
        ("nan_logits", lambda: layer.forward_microbatches(x, logits + (float("nan") if bad else 0))),
        ("splits", lambda: layer.forward_microbatches(x, logits, splits=0 if bad else 2)),
    ]:
        try:
            call()
            raised[what] = "none"
        except Exception as exc:  # noqa: BLE001 - the type is what the test reads
            raised[what] = type(exc).__name__
    # and the next calls run normally on every rank (batch-scaled payloads: finite)
    y = layer.forward_microbatches(x, logits)
    raised["after"] = torch.equal(y, layer(x, logits)) if combo.exact_micro else bool(torch.isfinite(y).all())
    return raised


def split_rank(group) -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    for combo in COMBOS:
        for case in CASES:
            try:
                out[str(combo), case.id] = {**check_halves(group, combo, case), **(
                    check_microbatches(group, combo, case) if combo.exact_micro else {})}
            except Exception as exc:  # noqa: BLE001 - reported by the test that reads this case
                out[str(combo), case.id] = {"error": f"{type(exc).__name__}: {exc}"}
        if combo not in FAILURE_COMBOS:
            continue
        try:
            out[str(combo), "failure"] = check_failures(group, combo)
        except Exception as exc:  # noqa: BLE001
            out[str(combo), "failure"] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


@pytest.fixture(scope="module")
def results():
    done: dict = {}

    def get(ranks: str, world: int) -> list[dict]:
        if (ranks, world) not in done:
            done[ranks, world] = (run_ranks(split_rank, world, timeout=300) if ranks == "gloo"
                                  else VirtualGroup(world, timeout=60).run(split_rank))
        return done[ranks, world]

    return get


def test_split_backends_are_declared():
    assert {"allgather", "nccl_a2a", "symm_a2a"} <= set(SPLIT_BACKENDS)
    assert COMM_BACKENDS["none"].split_phase and COMM_BACKENDS["symm_a2a"].calls_in_flight == 1
    assert all(COMM_BACKENDS[n].calls_in_flight is None for n in ("allgather", "nccl_a2a", "none"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("combo", COMBOS, ids=str)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("ranks", ["gloo", "virtual"])
def test_split_phases_equal_the_blocking_calls(results, ranks, world, combo, case):
    for rank, r in enumerate(results(ranks, world)):
        got = r[str(combo), case.id]
        where = f"{combo} W={world} case={case.id} ({ranks}) rank {rank}"
        assert "error" not in got, f"{where}: {got.get('error')}"
        assert got["finite"], where
        assert got["start_wait"], f"{where}: start + wait differs from the blocking call"
        assert got["interleaved"], f"{where}: interleaved halves differ from the calls in turn"
        if combo.exact_micro:
            for key in ("micro2", "micro3", "micro_routed"):
                assert got[key], f"{where}: forward_microbatches ({key}) differs from forward"


@pytest.mark.parametrize("combo", FAILURE_COMBOS, ids=str)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("ranks", ["gloo", "virtual"])
def test_a_failing_rank_raises_on_every_rank(results, ranks, world, combo):
    for rank, r in enumerate(results(ranks, world)):
        got = r[str(combo), "failure"]
        assert "error" not in got, got.get("error")
        own = rank == world - 1
        for what in ("dispatch_start", "nan_logits", "splits"):
            want = "ValueError" if own else "PeerFailedError"
            assert got[what] == want, f"{combo} W={world} ({ranks}) rank {rank}: {what} raised {got[what]}, not {want}"
        assert got["after"], f"{combo} W={world} ({ranks}) rank {rank}: the call after the failures differs"


def late_peer_rank(group) -> dict:
    """Rank 1 arrives 2 s late to an all-to-all-v and to a static combine (no per-call exchange):
    rank 0's starts return at once (the collectives are posted), its waits take the delay."""
    comm, runner = backend(group, Combo("nccl_a2a", static=True))
    x, routing, _ = rank_inputs(CASES[-1], group.rank)
    d = comm.dispatch(x, routing)
    out = runner(d)
    times = {}
    for what, start in [("all_to_all_v", lambda: group.start_all_to_all_v(torch.ones(2, 3), [1, 1], [1, 1])),
                        ("combine", lambda: comm.combine_start(out, d))]:
        if group.rank == 1:
            time.sleep(2.0)
        t0 = time.monotonic()
        pending = start()
        t1 = time.monotonic()
        pending.wait()
        times[what] = (t1 - t0, time.monotonic() - t1)
    return times


def test_posted_collectives_return_before_a_late_peer_arrives():
    for what, (start, wait) in run_ranks(late_peer_rank, 2)[0].items():
        assert start < 1.0 and wait > 1.0, f"{what}: start took {start:.2f}s, wait {wait:.2f}s"


def tp_rank(group) -> bool:
    """comm none with the tp layout (every rank the same tokens; combine's all-reduce posted)."""
    torch.set_num_threads(1)
    weights, shared = all_weights()
    layer = MoELayer.from_global(CFG, weights, group, comm="none", layout="tp", shared=shared)
    layer.runner = one_row_at_a_time(layer.runner.weights, CFG)
    x, _, logits = rank_inputs(CASES[-1], 0)
    return all(torch.equal(layer.forward_microbatches(x, logits, splits=s), layer(x, logits)) for s in (2, 3))


@pytest.mark.parametrize("ranks", ["gloo", "virtual"])
def test_microbatches_with_the_tp_layout(ranks):
    assert all(run_ranks(tp_rank, 2) if ranks == "gloo" else VirtualGroup(2).run(tp_rank))


def test_microbatches_on_one_rank_and_without_split_phases():
    """World 1 (comm none) and symm_a2a (one call in flight: micro-batches run in turn) on virtual ranks."""
    weights, shared = all_weights()
    x, routing, logits = rank_inputs(CASES[-1], 0)
    layer = MoELayer(CFG, weights, shared=shared)
    layer.runner = one_row_at_a_time(layer.runner.weights, CFG)
    for splits in (1, 2, 3, 20):
        assert torch.equal(layer.forward_microbatches(x, logits, splits=splits), layer(x, logits)), splits

    def symm(group) -> bool:
        layer = layer_of(group, Combo("symm_a2a"))
        x, _, logits = rank_inputs(CASES[-1], group.rank)
        return torch.equal(layer.forward_microbatches(x, logits), layer(x, logits))

    assert all(VirtualGroup(2).run(symm))
    with pytest.raises(ValueError, match="splits must be a positive int"):
        layer.forward_microbatches(x, logits, splits=0)
