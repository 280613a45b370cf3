"""Bad input through the public API: a table of cases, each naming the exception and the words
that name the problem, on one rank and on several (gloo ranks through tests/dist.py).

On several ranks the bad input is on one rank (`bad`); that rank raises its own error and every
other rank raises too (`PeerFailedError` naming the bad rank, or the agreement's ValueError
naming the ranks that differ) instead of waiting in a collective. All multi-rank cases of one
world size run in one launch, one after the other: every rank raising for every case is what
keeps the ranks in step (a rank left waiting would time out and the case would read wrong).
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from epmoe.checkpoint import load_moe_layer
from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights
from epmoe.experts.triton import TritonOptions
from epmoe.group import PeerFailedError, Placement
from epmoe.layer import MoELayer, SharedExperts
from epmoe.routing import Routing
from epmoe.select import Combo, ensure
from tests.dist import run_ranks

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2)
BIAS = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, routing="sigmoid_bias")
SHARED = MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, shared_experts=1)
T = 5


def _full(cfg: MoEConfig = CFG) -> ExpertWeights:
    return ExpertWeights.random(cfg, cfg.num_experts, generator=torch.Generator().manual_seed(0))


def _inputs(rank: int, tokens: int = T, cfg: MoEConfig = CFG) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(tokens, cfg.hidden, generator=g), torch.randn(tokens, cfg.num_experts, generator=g)


def _routing(tokens: int = T, lo: int = 0) -> Routing:
    ids = torch.stack([torch.arange(lo, lo + CFG.top_k, dtype=torch.int32)] * tokens) % CFG.num_experts
    return Routing(ids, torch.full((tokens, CFG.top_k), 0.5))


@dataclass(frozen=True)
class Case:
    """One bad input. build(group, bad) -> layer kwargs overrides of the layer built on the rank
    (`bad` = whether this rank holds the bad input); call(layer, bad) makes one forward call.

    error / words: what the bad rank raises (words: a regex on its message); peer / peer_words:
    what every other rank raises (None: the same as the bad rank)."""

    name: str
    error: type[BaseException]
    words: str
    build: Callable[[bool], dict[str, Any]] = field(default=lambda bad: {})
    call: Callable[[MoELayer, bool, int], Any] | None = None
    peer: type[BaseException] | None = None
    peer_words: str | None = None
    from_global: bool = True


def _fwd(x_edit=None, logits_edit=None, routing=None, tokens: int = T, no_logits: bool = False):
    """A forward call whose inputs the bad rank edits."""

    def call(layer: MoELayer, bad: bool, rank: int) -> Any:
        x, logits = _inputs(0 if layer.layout == "tp" else rank, tokens, layer.cfg)  # tp: the same tokens
        r = None
        if bad and x_edit is not None:
            x = x_edit(x)
        if bad and logits_edit is not None:
            logits = logits_edit(logits)
        if routing is not None:
            r, logits = (routing() if bad else _routing(x.shape[0])), None
        if no_logits and bad:
            logits = None
        return layer(x, logits, r)

    return call


def _set(t: torch.Tensor, idx: tuple, v: float) -> torch.Tensor:
    t = t.clone()
    t[idx] = v
    return t


def _bad_ids(value: int) -> Callable[[], Routing]:
    def make() -> Routing:
        r = _routing()
        r.ids[1, 0] = value
        return r
    return make


def _nan_weights() -> Routing:
    r = _routing()
    r.weights[2, 1] = float("nan")
    return r


def _dup_ids() -> Routing:
    r = _routing()
    r.ids[0] = 3
    return r


# Calls with one bad input (the same on one rank and on every comm of several ranks).
CALL_CASES = [
    Case("x float64", ValueError, r"x must be bf16, fp16 or fp32, got torch.float64", call=_fwd(lambda x: x.double())),
    Case("x int32", ValueError, r"x must be bf16, fp16 or fp32, got torch.int32", call=_fwd(lambda x: x.int())),
    Case("x 1-D", ValueError, r"x must be \[T, 32\], got \(160,\)", call=_fwd(lambda x: x.flatten())),
    Case("x wrong hidden", ValueError, r"x must be \[T, 32\], got \(5, 31\)", call=_fwd(lambda x: x[:, :31])),
    Case("x 3-D", ValueError, r"x must be \[T, 32\], got \(1, 5, 32\)", call=_fwd(lambda x: x[None])),
    Case("logits wrong E", ValueError, r"router_logits must be \[T, E\] = \[5, 8\].*got \(5, 7\)",
         call=_fwd(logits_edit=lambda t: t[:, :7])),
    Case("logits wrong T", ValueError, r"router_logits must be \[T, E\] = \[5, 8\].*got \(4, 8\)",
         call=_fwd(logits_edit=lambda t: t[:4])),
    Case("logits NaN", ValueError, r"router_logits contain NaN or inf",
         call=_fwd(logits_edit=lambda t: _set(t, (0, 0), float("nan")))),
    Case("logits inf", ValueError, r"router_logits contain NaN or inf",
         call=_fwd(logits_edit=lambda t: _set(t, (4, 7), float("inf")))),
    Case("logits -inf", ValueError, r"router_logits contain NaN or inf",
         call=_fwd(logits_edit=lambda t: _set(t, (2, 1), -float("inf")))),
    Case("routed id = E", ValueError, r"routing ids must lie in \[0, 8\), got values in \[\d+, 8\]",
         call=_fwd(routing=_bad_ids(8))),
    Case("routed id huge", ValueError, r"routing ids must lie in \[0, 8\).*1000", call=_fwd(routing=_bad_ids(1000))),
    Case("routed id -2", ValueError, r"routing ids must lie in \[0, 8\), got values in \[-2,",
         call=_fwd(routing=_bad_ids(-2))),
    Case("routed weight NaN", ValueError, r"routing weights contain NaN or inf", call=_fwd(routing=_nan_weights)),
    Case("routed ids repeat", ValueError, r"routing ids repeat an expert within token 0", call=_fwd(routing=_dup_ids)),
    Case("routing of other T", ValueError, r"routing must be \[5, 2\] for x of 5 tokens, got \(3, 2\)",
         call=_fwd(routing=lambda: _routing(3))),
    Case("no logits, no gate", ValueError, r"pass router_logits or routing, or build the layer with gate=",
         call=_fwd(no_logits=True)),
]


def _weights_shape(bad: bool) -> dict[str, Any]:
    if not bad:
        return {}
    w = _full()
    return {"all_weights": ExpertWeights(w.w13[:, :, :31], w.w2)}


# Construction with one bad argument (on several ranks: on one rank only).
BUILD_CASES = [
    Case("unknown comm", ValueError, r"unknown comm backend 'nccl'.*allgather",
         build=lambda bad: {"comm": "nccl"} if bad else {}),
    Case("unknown runner", ValueError, r"unknown expert runner 'cutlass'",
         build=lambda bad: {"runner": "cutlass"} if bad else {}),
    Case("unknown layout", ValueError, r"unknown layout 'ep'; choose one of",
         build=lambda bad: {"layout": "ep"} if bad else {}),
    Case("comm option typo", ValueError, r"comm 'allgather' has no option 'max_token_per_rank'; its options:",
         build=lambda bad: {"comm": "allgather", "comm_options": {"max_token_per_rank": 4}} if bad else
         {"comm": "allgather"}),
    Case("comm option value", ValueError, r"max_tokens_per_rank must be a positive int, got -1",
         build=lambda bad: {"comm": "allgather", "comm_options": {"max_tokens_per_rank": -1}} if bad else
         {"comm": "allgather"}),
    Case("static without bound", ValueError, r"static_shapes needs max_tokens_per_rank",
         build=lambda bad: {"comm": "nccl_a2a", "comm_options": {"static_shapes": True}} if bad else
         {"comm": "nccl_a2a"}),
    Case("unknown payload", ValueError, r"payload",
         build=lambda bad: {"comm": "nccl_a2a", "comm_options": {"payload": "int4"}} if bad else
         {"comm": "nccl_a2a"}),
    Case("weights wrong shape", ValueError, r"expert weight w13 has shape .*expected", build=_weights_shape),
    Case("weights float64", ValueError, r"expert weight w13 is float64",
         build=lambda bad: {"all_weights": ExpertWeights(_full().w13.double(), _full().w2)} if bad else {}),
    Case("gate wrong shape", ValueError, r"gate must be \[8, 32\], got \(8, 31\)",
         build=lambda bad: {"gate": torch.zeros(8, 31)} if bad else {}),
    Case("gate_bias without gate", ValueError, r"gate_bias is added to the gate's logits; pass gate=",
         build=lambda bad: {"gate_bias": torch.zeros(8)} if bad else {}),
    Case("gate_bias wrong shape", ValueError, r"gate_bias must be a float \[8\] tensor",
         build=lambda bad: {"gate": torch.zeros(8, 32), "gate_bias": torch.zeros(7)} if bad else
         {"gate": torch.zeros(8, 32)}),
    Case("shared experts of wrong width", ValueError, r"shared experts must be w13 \[32, 32\]",
         build=lambda bad: {"cfg": SHARED, "shared": SharedExperts(torch.zeros(30, 32), torch.zeros(32, 16))} if bad
         else {"cfg": SHARED, "shared": SharedExperts.random(SHARED)}),
    Case("cfg needs shared experts", ValueError, r"cfg has 1 shared experts; pass shared=SharedExperts",
         build=lambda bad: {"cfg": SHARED} if bad else {"cfg": SHARED, "shared": SharedExperts.random(SHARED)}),
    Case("bias routing without bias", ValueError, r"routing 'sigmoid_bias' needs correction_bias \[E\]",
         build=lambda bad: {"cfg": BIAS} if bad else {"cfg": BIAS, "correction_bias": torch.zeros(8)}),
    Case("correction bias NaN", ValueError, r"correction_bias",
         build=lambda bad: {"cfg": BIAS, "correction_bias": torch.full((8,), float("nan")) if bad else
                            torch.zeros(8)}),
]


def _layer(group, bad: bool, case: Case, comm: str) -> MoELayer:
    """comm: a backend's name, or "none/tp" (the tp layout)."""
    comm, _, layout = comm.partition("/")
    kw: dict[str, Any] = {"comm": comm, "layout": layout or "dp"}
    kw.update(case.build(bad))
    cfg = kw.pop("cfg", CFG)
    full = kw.pop("all_weights", _full(cfg))
    return MoELayer.from_global(cfg, full, group, **kw)


def _outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the outcome is the case's result
        return type(exc).__name__, str(exc)
    return "none", ""


def _check(case: Case, got: tuple[str, str], bad: bool, tag: str) -> list[str]:
    want_type = case.error if bad or case.peer is None else case.peer
    words = case.words if bad or case.peer_words is None else case.peer_words
    name, msg = got
    if name != want_type.__name__:
        return [f"{tag} {case.name}: raised {name} ({msg[:200]}), want {want_type.__name__}"]
    if not re.search(words, msg):
        return [f"{tag} {case.name}: message {msg[:300]!r} lacks {words!r}"]
    return []


# ---- one rank --------------------------------------------------------------------------

@pytest.mark.parametrize("case", CALL_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("comm", ["none", "nccl_a2a"])
def test_bad_call_on_one_rank(case, comm):
    layer = _layer(None, False, case, comm)
    with pytest.raises(case.error, match=case.words):
        case.call(layer, True, 0)


@pytest.mark.parametrize("case", BUILD_CASES, ids=lambda c: c.name)
def test_bad_construction_on_one_rank(case):
    with pytest.raises(case.error, match=case.words):
        _layer(None, True, case, "none")


@dataclass(frozen=True)
class Direct:
    """One bad input outside a layer call (helpers, options, environment, checkpoints): run() must
    raise `error` with `words` (a regex). env: variables set for the run."""

    name: str
    error: type[BaseException]
    words: str
    run: Callable[[], Any]
    env: dict[str, str] = field(default_factory=dict)


def _scratch_env(value: str) -> Direct:
    return Direct(f"EPMOE_DEQUANT_SCRATCH_MB={value!r}", ValueError,
                  rf"EPMOE_DEQUANT_SCRATCH_MB='{re.escape(value)}' must be a number of megabytes, finite and > 0 "
                  r"\(default 1024\)", lambda: TritonOptions(), {"EPMOE_DEQUANT_SCRATCH_MB": value})


def _checkpoint(value: float) -> Any:
    """A bf16 checkpoint whose expert 5 holds `value` in its down projection, loaded by rank 1 of 2."""
    from tests.test_checkpoint import DS, LAYER, build

    name = f"model.layers.{LAYER}.mlp.experts.5.down_proj.weight"
    with tempfile.TemporaryDirectory() as tmp:
        b = build(Path(tmp), "bf16", edit=lambda t: t[name].__setitem__((0, 0), value))
        return load_moe_layer(b.path, DS, LAYER, rank=1, world=2)


def _layer_call(comm: str, tokens: int, **options: Any) -> Any:
    layer = MoELayer.from_global(CFG, _full(), comm=comm, comm_options=options)
    x, logits = _inputs(0, tokens)
    return layer(x, logits)


# The silent and unclear cases, and the other checks outside a forward call (one rank).
DIRECT_CASES = [
    Direct("from_global with more experts", ValueError,
           r"all_weights holds 16 experts, cfg has num_experts=8; pass the weights of every expert",
           lambda: MoELayer.from_global(CFG, _full(CFG.replace(num_experts=16)))),
    Direct("from_global with fewer experts", ValueError, r"all_weights holds 4 experts, cfg has num_experts=8",
           lambda: MoELayer.from_global(CFG, _full(CFG.replace(num_experts=4)))),
    Direct("auto option typo", ValueError, r"comm 'auto' has no option 'max_token_per_rank'; its candidates' options:",
           lambda: MoELayer.from_global(CFG, _full(), comm="auto", comm_options={"max_token_per_rank": 4})),
    Direct("select world=0", ValueError, r"world=0: a layer needs at least one EP rank \(world >= 1\)",
           lambda: ensure(Combo(world=0))),
    Direct("select nodes > world", ValueError, r"nodes=3 > world=2: every host holds at least one rank",
           lambda: ensure(Combo(comm="nccl_a2a", world=2, nodes=3))),
    Direct("select nodes=0", ValueError, r"nodes", lambda: ensure(Combo(comm="nccl_a2a", world=2, nodes=0))),
    *[_scratch_env(v) for v in ("nan", "inf", "-inf", "1e400", "0", "-5", "abc", "")],
    Direct("dequant_scratch_mb=nan", ValueError, r"dequant_scratch_mb=nan must be a number of megabytes",
           lambda: TritonOptions(dequant_scratch_mb=float("nan"))),
    Direct("EPMOE_NVFP4_DECODE unknown", ValueError,
           r"EPMOE_NVFP4_DECODE must be one of gluon, mma, fma, tl, got 'fast'", lambda: TritonOptions(),
           {"EPMOE_NVFP4_DECODE": "fast"}),
    Direct("checkpoint weights NaN", ValueError,
           r"expert 5's w2 \(down\) weights hold NaN or inf.*check_finite=False", lambda: _checkpoint(float("nan"))),
    Direct("checkpoint weights inf", ValueError,
           r"expert 5's w2 \(down\) weights hold NaN or inf", lambda: _checkpoint(float("inf"))),
    Direct("static T over the bound", ValueError, r"T=9 exceeds max_tokens_per_rank=8",
           lambda: _layer_call("nccl_a2a", 9, static_shapes=True, max_tokens_per_rank=8)),
    Direct("symm_a2a T over the workspace", ValueError, r"9 tokens on rank 0 exceed max_tokens_per_rank=8",
           lambda: _layer_call("symm_a2a", 9, max_tokens_per_rank=8)),
    Direct("graphs on the CPU", ValueError, r"capture_graphs needs the layer's weights on a CUDA device",
           lambda: MoELayer.from_global(CFG, _full()).capture_graphs(8)),
    Direct("micro-batch splits 0", ValueError, r"splits must be a positive int",
           lambda: MoELayer.from_global(CFG, _full()).forward_microbatches(*_inputs(0), splits=0)),
    Direct("placement of another world", ValueError, r"placement covers 8 experts on 2 ranks, layer has 8 experts on 1",
           lambda: MoELayer(CFG, _full(), placement=Placement.contiguous(8, 2))),
]


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: c.name)
def test_bad_input_outside_a_call(case, monkeypatch):
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(case.error, match=case.words):
        case.run()


def test_combo_reports_the_payload_that_moves():
    # payload="fp8" under auto on one rank: no backend that moves tokens runs, so bf16 moves and combo says so
    layer = MoELayer.from_global(CFG, _full(), comm="auto", comm_options={"payload": "fp8"})
    layer(*_inputs(0))
    assert (layer.combo.comm, layer.combo.payload) == ("none", "bf16")


# ---- several ranks ---------------------------------------------------------------------

PEER = r"rank {bad} failed its own checks, so no rank goes ahead"


def _multi_calls(group, comms: list[str], bad_rank: int) -> list[str]:
    """Every call case on every comm, bad input on `bad_rank`; returns the problems found."""
    problems = []
    for comm in comms:
        layer = _layer(group, False, Case("ok", ValueError, ""), comm)
        for case in CALL_CASES:
            bad = group.rank == bad_rank
            got = _outcome(lambda: case.call(layer, bad, group.rank))  # noqa: B023
            peer = Case(case.name, case.error, case.words, peer=PeerFailedError,
                        peer_words=PEER.format(bad=bad_rank) + rf" \(rank {bad_rank}: {case.error.__name__}: ")
            problems += _check(peer, got, bad, f"rank {group.rank} {comm}")
        # the ranks stay in step: a good call afterwards works on every rank
        x, logits = _inputs(0 if layer.layout == "tp" else group.rank)
        if tuple(layer(x, logits).shape) != (T, CFG.hidden):
            problems.append(f"rank {group.rank} {comm}: a good call after the bad ones failed")
        for backend in layer.comms.values():
            if hasattr(backend, "destroy"):  # symm_a2a's workspace (collective)
                backend.destroy()
    return problems


def _multi_builds(group, bad_rank: int) -> list[str]:
    problems = []
    for case in BUILD_CASES:
        bad = group.rank == bad_rank
        got = _outcome(lambda: _layer(group, bad, case, "nccl_a2a"))  # noqa: B023
        peer = Case(case.name, case.error, case.words, peer=PeerFailedError,
                    peer_words=PEER.format(bad=bad_rank) + rf" \(rank {bad_rank}: {case.error.__name__}: ")
        problems += _check(peer, got, bad, f"rank {group.rank} build")
    return problems


# Ranks built differently: every rank raises the agreement's ValueError naming the difference.
DIFFER_CASES = [
    ("comm", {"comm": "nccl_a2a"}, {"comm": "allgather"}, r"differ from rank 0 on comm \(rank 0: 'nccl_a2a'"),
    ("layout+comm", {"comm": "nccl_a2a"}, {"comm": "none", "layout": "tp"},
     r"differ from rank 0 on comm .*on layout \(rank 0: 'dp'"),
    ("options", {"comm": "allgather"}, {"comm": "allgather", "comm_options": {"payload": "fp8"}},
     r"differ from rank 0 on comm_options"),
    ("activation", {}, {"cfg": MoEConfig(hidden=32, intermediate=16, num_experts=8, top_k=2, activation="gelu")},
     r"differ from rank 0 on config"),
    ("validate", {}, {"validate": False}, r"differ from rank 0 on validate"),
    ("experts", {}, {"cfg": MoEConfig(hidden=32, intermediate=16, num_experts=16, top_k=2)},
     r"differ from rank 0 on .*experts \(rank 0: 8"),
    ("hidden", {}, {"cfg": MoEConfig(hidden=48, intermediate=16, num_experts=8, top_k=2)},
     r"differ from rank 0 on .*hidden \(rank 0: 32"),
    ("weights dtype", {}, {"all_weights": ExpertWeights(_full().w13.bfloat16(), _full().w2.bfloat16())},
     r"differ from rank 0 on .*weights \(format, dtypes, shapes\)"),
    ("comm symm_a2a", {"comm": "nccl_a2a"}, {"comm": "symm_a2a"}, r"differ from rank 0 on comm \(rank 0: 'nccl_a2a'"),
    ("gate on one rank", {}, {"gate": torch.zeros(8, 32)}, r"differ from rank 0 on router \(gate, gate_bias"),
    ("gate values", {"gate": torch.zeros(8, 32)}, {"gate": torch.ones(8, 32)}, r"differ from rank 0 on router"),
    ("gate_bias values", {"gate": torch.zeros(8, 32), "gate_bias": torch.zeros(8)},
     {"gate": torch.zeros(8, 32), "gate_bias": torch.ones(8)}, r"differ from rank 0 on router"),
    ("correction bias values", {"cfg": BIAS, "correction_bias": torch.zeros(8)},
     {"cfg": BIAS, "correction_bias": torch.full((8,), 0.5)}, r"differ from rank 0 on router"),
    ("shared experts dtype", {"cfg": SHARED, "shared": SharedExperts.random(SHARED)},
     {"cfg": SHARED, "shared": SharedExperts.random(SHARED, dtype=torch.bfloat16)},
     r"differ from rank 0 on shared experts \(shapes\)"),
]


def _multi_differ(group, bad_rank: int) -> list[str]:
    problems = []
    for name, good, other, words in DIFFER_CASES:
        kw = dict(other if group.rank == bad_rank else good)
        kw.setdefault("comm", "nccl_a2a")
        cfg = kw.pop("cfg", CFG)
        full = kw.pop("all_weights", _full(cfg))
        if "placement" in kw:
            kw["placement"] = kw["placement"](group.world)
        got = _outcome(lambda: MoELayer.from_global(cfg, full, group, **kw))  # noqa: B023
        problems += _check(Case(name, ValueError, rf"ranks \[{bad_rank}\] {words}"), got, True,
                           f"rank {group.rank} differ")
    # placements that differ (same experts, other ranks)
    p = Placement.contiguous(CFG.num_experts, group.world)
    if group.rank == bad_rank:
        p = Placement(p.expert_rank.flip(0), p.expert_local.flip(0), p.world, p.local_experts)
    local = _full().select(p.global_ids(group.rank))
    got = _outcome(lambda: MoELayer(CFG, local, group, comm="nccl_a2a", placement=p))
    problems += _check(Case("placement", ValueError, rf"ranks \[{bad_rank}\] differ from rank 0 on placement"),
                       got, True, f"rank {group.rank} differ")
    # tp: other tokens on one rank (count, then values) under validate=True
    layer = MoELayer.from_global(CFG, _full(), group, layout="tp")
    for tokens, seed in ((T + 1, 0), (T, 1)):
        x, logits = _inputs(0)
        if group.rank == bad_rank:
            x, logits = _inputs(seed + 5, tokens)
        got = _outcome(lambda: layer(x, logits))  # noqa: B023
        same = "; same T, other values" if tokens == T else ""
        problems += _check(Case("tp tokens", ValueError, rf"ranks \[{bad_rank}\] pass other tokens than rank 0 "
                                rf"\(rank 0: T={T}.*{same}"), got, True, f"rank {group.rank} tp")
    # tp: the same x, routing on one rank and router logits on the others
    x, logits = _inputs(0)
    got = _outcome(lambda: layer(x, None, _routing()) if group.rank == bad_rank else layer(x, logits))
    problems += _check(Case("tp routing vs logits", ValueError, rf"ranks \[{bad_rank}\] pass other tokens than "
                            rf"rank 0 \(rank 0: T={T}.*; same T, other values"), got, True, f"rank {group.rank} tp")
    return problems


MULTI_COMMS = ["nccl_a2a", "allgather", "symm_a2a", "auto", "none/tp"]


def _multi(group, bad_rank: int) -> list[str]:
    return (_multi_calls(group, MULTI_COMMS, bad_rank) + _multi_builds(group, bad_rank)
            + _multi_differ(group, bad_rank))


@pytest.mark.parametrize(("world", "bad_rank"), [(2, 1), (4, 2)])
def test_bad_input_on_one_of_several_ranks_raises_on_every_rank(world, bad_rank):
    problems = run_ranks(_multi, world, args=(bad_rank,), timeout=300, collective_timeout=20)
    flat = [p for rank in problems for p in rank]
    assert not flat, "\n".join(flat[:20])


def test_the_table_is_large_enough():
    multi = len(CALL_CASES) * len(MULTI_COMMS) + len(BUILD_CASES) + len(DIFFER_CASES) + 4
    assert len(CALL_CASES) * 2 + len(BUILD_CASES) + len(DIRECT_CASES) >= 60 and multi >= 60


def _virtual_nan_on_rank1(group, comm: str = "nccl_a2a", device: str = "cpu") -> str:
    full = _full()
    if device != "cpu":
        full = ExpertWeights(full.w13.to(device, torch.bfloat16), full.w2.to(device, torch.bfloat16))
    layer = MoELayer.from_global(CFG, full, group, comm=comm)
    x, logits = (t.to(device) for t in _inputs(group.rank))
    x = x.to(layer.dtype)
    if group.rank == 1:
        logits[0, 0] = float("nan")
    try:
        layer(x, logits)
    except PeerFailedError as exc:
        return f"peer: {exc}"
    except ValueError as exc:
        return f"own: {exc}"
    return "went ahead"


def test_virtual_ranks_raise_alike_and_the_failure_travels_in_the_exchange():
    from epmoe.comm.base import failure_ints, failure_text
    from epmoe.group import VirtualGroup

    got = VirtualGroup(2, timeout=20).run(_virtual_nan_on_rank1)
    assert got[1] == "own: router_logits contain NaN or inf; check the router input"
    assert re.search(r"peer: comm 'nccl_a2a' on rank 0: rank 1 failed its own checks, so no rank goes ahead "
                     r"\(rank 1: ValueError: router_logits contain NaN or inf", got[0]), got[0]
    got = VirtualGroup(2, timeout=20).run(lambda g: _virtual_nan_on_rank1(g, "symm_a2a"))  # its call agreement
    assert got[1] == "own: router_logits contain NaN or inf; check the router input"
    assert re.search(r"peer: symm_a2a rank 0, call 1: rank 1 failed its own checks, so no rank goes ahead "
                     r"\(rank 1: ValueError: router_logits contain NaN or inf", got[0]), got[0]
    text = "ValueError: " + "é" * 100  # cut at 120 bytes, a split character replaced
    assert failure_text(failure_ints(text)).startswith("ValueError: éé")
    assert failure_ints(None) == [0] * 16


# ---- graph replays on several ranks (a CPU stand-in for the captured graph) --------------------

class _NoGraph:
    """Stands in for a captured CUDA graph: replaying it does nothing (the exchange before it is
    what these cases test; the graphs themselves need a GPU, tests/test_graphs.py)."""

    def replay(self) -> None:
        pass


def _replaying(group, layout: str, routed: bool) -> MoELayer:
    """A layer whose graphs "hold" one bucket of 8 tokens (`_NoGraph`), validate=True."""
    from epmoe.graphs import Bucket, LayerGraphs

    layer = MoELayer.from_global(CFG, _full(), group, comm="none" if layout == "tp" else "nccl_a2a", layout=layout,
                                 comm_options={} if layout == "tp" else {"static_shapes": True,
                                                                         "max_tokens_per_rank": 8})
    layer.graphs = LayerGraphs(layer, [8], routed=routed, validate=True)
    layer.graphs.graphs[8] = Bucket(8, _NoGraph(), torch.zeros(8, CFG.hidden), layer.comm)
    return layer


# (name, layout, routed, what the bad rank passes, error, words): the peers replay with good input
REPLAY_CASES = [
    ("replay NaN logits", "dp", False, "nan", ValueError, r"router_logits contain NaN or inf"),
    ("replay NaN logits tp", "tp", False, "nan", ValueError, r"router_logits contain NaN or inf"),
    ("replay routed id = E", "dp", True, "id", ValueError, r"routing ids must lie in \[0, 8\)"),
    ("replay routed id = E tp", "tp", True, "id", ValueError, r"routing ids must lie in \[0, 8\)"),
    ("call float64 while peers replay", "dp", False, "float64", ValueError, r"x must be bf16, fp16 or fp32"),
    ("call float64 while peers replay tp", "tp", False, "float64", ValueError, r"x must be bf16, fp16 or fp32"),
]


def _multi_replays(group, bad_rank: int) -> list[str]:
    problems = []
    for name, layout, routed, kind, error, words in REPLAY_CASES:
        layer = _replaying(group, layout, routed)
        bad = group.rank == bad_rank
        x, logits = _inputs(0 if layout == "tp" else group.rank)
        routing = _routing() if routed else None
        if bad and kind == "nan":
            logits = _set(logits, (1, 2), float("nan"))
        if bad and kind == "id":
            routing = _bad_ids(8)()

        def call(x=x, logits=logits, routing=routing, layer=layer, bad=bad, kind=kind, routed=routed) -> Any:
            if bad and kind == "float64":  # fails forward's shape checks: reported in the peers' replay exchange
                return layer(x.double(), None if routed else logits, routing)
            return layer.graphs.replay(x, None if routed else logits, routing, 8)

        peer = Case(name, error, words, peer=PeerFailedError,
                    peer_words=PEER.format(bad=bad_rank) + rf" \(rank {bad_rank}: {error.__name__}: ")
        problems += _check(peer, _outcome(call), bad, f"rank {group.rank}")
        # in step: a good replay afterwards works on every rank
        x, logits = _inputs(0 if layout == "tp" else group.rank)
        got = _outcome(lambda x=x, logits=logits, layer=layer, routed=routed: layer.graphs.replay(
            x, None if routed else logits, _routing() if routed else None, 8))
        if got[0] != "none":
            problems.append(f"rank {group.rank} {name}: a good replay after the bad one raised {got}")
    return problems


@pytest.mark.parametrize(("world", "bad_rank"), [(2, 0), (4, 3)])
def test_bad_input_at_replay_on_one_rank_raises_on_every_rank(world, bad_rank):
    problems = run_ranks(_multi_replays, world, args=(bad_rank,), timeout=300, collective_timeout=20)
    flat = [p for rank in problems for p in rank]
    assert not flat, "\n".join(flat[:20])


@pytest.mark.gpu
@pytest.mark.parametrize("comm", ["nccl_a2a", "symm_a2a"])
def test_gpu_virtual_ranks_raise_alike(comm):
    from epmoe.group import VirtualGroup

    got = VirtualGroup(2, timeout=120).run(lambda g: _virtual_nan_on_rank1(g, comm, "cuda"))
    assert got[1] == "own: router_logits contain NaN or inf; check the router input"
    assert re.search(r"peer: .*rank 1 failed its own checks, so no rank goes ahead \(rank 1: ValueError: "
                     r"router_logits contain NaN or inf", got[0]), got[0]
