"""Adding a comm backend or a runner is its class plus one registry line (docs/design.md, "Adding a
comm backend / a runner"): nothing in select.py, layer.py or the auto pick names a backend, so a
new one is checked, selected, run and reported with no other change."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from epmoe import ExpertWeights, MoEConfig, MoELayer
from epmoe.comm import COMM_BACKENDS
from epmoe.comm.base import CommBackend, CommOptions, Dispatched
from epmoe.experts import RUNNERS
from epmoe.experts.base import ExpertRunner
from epmoe.experts.reference import reference_experts
from epmoe.ops.combine import local_dispatch, weighted_sum
from epmoe.routing import Routing
from epmoe.select import Combo, check

CFG = MoEConfig.from_preset("qwen3-30b-a3b").scaled(hidden=32, intermediate=16, num_experts=8)


@dataclasses.dataclass(frozen=True)
class LoopbackOptions(CommOptions):
    scale: float = 1.0  # multiplies the output: proves the option reaches the backend

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


class LoopbackComm(CommBackend):
    """One rank, every expert local: the smallest backend that satisfies the contract."""

    name = "loopback"
    layouts = ("dp",)
    payloads = ("bf16",)
    devices = ("cpu", "cuda")
    needs_host_sync = False
    static_capable = False
    single_node = False
    moves_tokens = False
    split_phase = False
    Options = LoopbackOptions

    def dispatch(self, x: torch.Tensor, routing: Routing, max_tokens: int | None = None) -> Dispatched:
        pairs = local_dispatch(routing.ids, self.placement_on(x.device), self.rank)
        return Dispatched(x, pairs.row_ids, pairs.expert_ids, pairs.counts, handle=(routing, x.dtype))

    def combine(self, expert_out: torch.Tensor, dispatched: Dispatched, out: torch.Tensor | None = None, *,
                addend: torch.Tensor | None = None) -> torch.Tensor:
        routing, dtype = dispatched.handle
        T, K = routing.ids.shape
        acc = weighted_sum(expert_out, routing.weights, dispatched.expert_ids.view(T, K), T, K, addend=addend)
        return (acc * self.options.scale).to(dtype)


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    pass


class LoopRunner(ExpertRunner):
    """A runner that loops over the experts in plain torch (the reference, renamed)."""

    name = "loop"
    formats: ClassVar[tuple[str, ...]] = ("bf16",)
    devices = ("cpu",)
    needs_host_sync = True
    priority = -1  # never picked by runner="auto" over the shipped ones
    Options = LoopOptions

    @classmethod
    def prepare(cls, weights: ExpertWeights, cfg: MoEConfig) -> ExpertWeights:
        return weights

    def __call__(self, d: Dispatched, out: torch.Tensor | None = None) -> torch.Tensor:
        return reference_experts(d.hidden, d.row_ids, d.expert_ids, self.weights, self.cfg)


@pytest.fixture
def registered(monkeypatch):
    """Register both for one test (the one line a real backend / runner file has)."""
    monkeypatch.setitem(COMM_BACKENDS._items, "loopback", LoopbackComm)
    monkeypatch.setitem(RUNNERS._items, "loop", LoopRunner)


def test_registry_refuses_a_backend_that_declares_too_little():
    class Vague(CommBackend):
        name = "vague"
        layouts = ("dp",)

    with pytest.raises(TypeError, match="must declare payloads"):
        COMM_BACKENDS.register(Vague)
    assert "vague" not in COMM_BACKENDS


def test_a_new_backend_and_runner_plug_in_with_no_other_change(registered):
    assert check(Combo(comm="loopback", runner="loop"))[0]
    ok, reason = check(Combo(comm="loopback", runner="loop", device="cuda"))
    assert not ok and "runner 'loop' runs on cpu" in reason
    ok, reason = check(Combo(comm="loopback", world=2))
    assert not ok, reason  # moves no tokens: one rank only under dp

    g = torch.Generator().manual_seed(0)
    w = ExpertWeights.random(CFG, CFG.num_experts, generator=g)
    x, logits = torch.randn(6, CFG.hidden, generator=g), torch.randn(6, CFG.num_experts, generator=g)
    expected = MoELayer(CFG, w, comm="none", runner="reference")(x, logits)
    layer = MoELayer(CFG, w, comm="loopback", runner="loop", comm_options={"scale": 2.0})
    torch.testing.assert_close(layer(x, logits), 2 * expected)
    assert (layer.combo.comm, layer.combo.runner) == ("loopback", "loop")
    with pytest.raises(ValueError, match="comm 'loopback' has no option 'scal'; its options: scale"):
        MoELayer(CFG, w, comm="loopback", comm_options={"scal": 2.0})
    with pytest.raises(ValueError, match="scale must be > 0"):
        MoELayer(CFG, w, comm="loopback", comm_options={"scale": 0.0})
    # runner="auto" keeps the faster shipped runner (priority): the new one is picked only by name
    assert MoELayer(CFG, w).combo.runner == "reference"
