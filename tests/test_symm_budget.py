"""symm_a2a's SM budget (`sm_budget`): every kernel launch takes at most that many programs.

CPU: the Triton kernels through the interpreter give the same bits (pair lists, received rows,
outputs) under budgets 1, 2 and 5 as with none, over the uneven, empty, full, masked and
one-rank cases; every launch's grid is recorded and stays within the budget; bad values raise
at construction. GPU (skipped here): a budget past the device's SM count raises naming it, and
budgets 1, 8 and every SM give the bits of None on virtual ranks.
"""

from __future__ import annotations

import pytest
import torch

from epmoe import Placement, VirtualGroup
from epmoe.comm.symmetric import SymmA2A, SymmOptions
from epmoe.experts.base import as_float
from epmoe.kernels import symm_a2a as kernels
from epmoe.routing import Routing
from tests.test_symm_a2a import (
    CASES,
    CFG,
    TM,
    _virtual_backends,
    inputs,
    interpreted,
    make_symm,
    split_phase_call,
    synthetic_experts,
)

KERNELS = ("symm_dispatch_send_kernel", "symm_dispatch_recv_kernel", "symm_combine_send_kernel",
           "symm_combine_recv_kernel")


class _Recorded:
    """Stands in for a @triton.jit kernel: records each launch's grid, then launches it."""

    def __init__(self, kernel, grids: list[tuple[str, tuple[int, ...]]], name: str) -> None:
        self.kernel, self.grids, self.name = kernel, grids, name

    def __getitem__(self, grid):
        self.grids.append((self.name, tuple(grid)))
        return self.kernel[grid]


def _calls(bs: list[SymmA2A], payload: str) -> list[torch.Tensor]:
    """Every case but the wrap (sequence numbers are the other test's) through the phase calls:
    per case and rank the pair expert ids, row ids, received rows of the valid pairs and output."""
    world, seen, got = len(bs), [], []
    for case in CASES:
        if case.wrap:
            continue
        ev = [inputs(case, r, world) for r in range(world)]
        xs, rs = [x for x, _, _ in ev], [Routing(i, w) for _, i, w in ev]

        def experts(r, d):
            valid = d.row_ids[d.expert_ids >= 0].long()
            seen.extend((d.expert_ids.clone(), d.row_ids.clone(), as_float(d.hidden)[valid].clone()))
            return synthetic_experts(d, torch.float32)

        got.extend(split_phase_call(bs, xs, rs, experts, max(case.tokens[:world]) if payload == "fp8" else None))
    for b in bs:
        b.check()
    return seen + got


@interpreted
@pytest.mark.parametrize(("world", "payload", "mode"), [(3, "bf16", "push"), (2, "fp8", "pull")])
def test_budgets_give_the_bits_of_none_and_cap_every_grid(world, payload, mode, monkeypatch):
    """Budgets 1, 2, 5 against None: identical pair lists, rows and outputs; every launch of a
    budgeted backend has at most `budget` programs (one program runs every item at budget 1)."""
    grids: list[tuple[str, tuple[int, ...]]] = []
    for name in KERNELS:
        monkeypatch.setattr(kernels, name, _Recorded(getattr(kernels, name), grids, name))
    opts = {"payload": payload, "combine_mode": mode, "device": "cpu", "dtype": torch.float32}
    want = _calls(_virtual_backends(world, impl="triton", **opts), payload)
    assert any(g[0] > 2 for _, g in grids)  # without a budget some grid is wider than the budgets below
    for budget in (1, 2, 5):
        grids.clear()
        got = _calls(_virtual_backends(world, impl="triton", sm_budget=budget, **opts), payload)
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"budget {budget}: item {i} differs"
        assert {n for n, _ in grids} == set(KERNELS)
        assert all(len(g) == 1 and 1 <= g[0] <= budget for _, g in grids), f"budget {budget}: {set(grids)}"


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", True])
def test_bad_budget_raises_naming_it(bad):
    with pytest.raises(ValueError, match="sm_budget must be a positive int"):
        SymmOptions(sm_budget=bad)
    with pytest.raises(ValueError, match="sm_budget must be a positive int"):
        make_symm(CFG, None, Placement.contiguous(CFG.num_experts, 1), sm_budget=bad)


def test_budget_on_the_torch_twin_changes_nothing():
    """impl='torch' launches no kernel: the budget is accepted and the results are the twin's."""
    placement = Placement.contiguous(CFG.num_experts, 2)
    outs = []
    for budget in (None, 1):
        bs = VirtualGroup(2).run(lambda g, budget=budget: make_symm(
            CFG, g, placement, impl="torch", max_tokens_per_rank=TM, sm_budget=budget))
        ev = [inputs(CASES[0], r, 2) for r in range(2)]
        outs.append(split_phase_call(bs, [x for x, _, _ in ev], [Routing(i, w) for _, i, w in ev],
                                     lambda r, d: synthetic_experts(d, torch.float32)))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.gpu
def test_gpu_budget_past_the_sm_count_raises():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    with pytest.raises(ValueError, match=rf"sm_budget={sms + 1} exceeds the {sms} SMs"):
        make_symm(CFG, None, Placement.contiguous(CFG.num_experts, 1), "cuda", sm_budget=sms + 1)


@pytest.mark.gpu
def test_gpu_budgets_give_the_bits_of_none_on_virtual_ranks():
    """W = 2 virtual ranks on one GPU, every case: budgets 1, 8 and every SM equal None bit for bit."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    opts = {"device": "cuda", "dtype": torch.bfloat16, "timeout_s": 30.0}
    runs = {}
    for budget in (None, 1, 8, sms):
        bs = _virtual_backends(2, impl="triton", sm_budget=budget, **opts)
        outs = []
        for case in CASES:
            if case.wrap:
                continue
            ev = [inputs(case, r, 2) for r in range(2)]
            outs += split_phase_call(bs, [x.to("cuda", torch.bfloat16) for x, _, _ in ev],
                                     [Routing(i.cuda(), w.cuda()) for _, i, w in ev],
                                     lambda r, d: synthetic_experts(d, torch.bfloat16))
        for b in bs:
            b.check()
        runs[budget] = outs
    for budget, outs in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(outs, runs[None])), f"budget {budget}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (gloo ranks)")
def test_bench_flag_adds_a_row_per_budget(tmp_path, capsys):
    import json

    from epmoe.bench.comm import sm_budgets
    from epmoe.cli import main

    assert sm_budgets("8,16,all") == (8, 16, None) and sm_budgets(None) == (None,)
    for bad in ("0", "8,x", ","):
        with pytest.raises(ValueError, match="--sm-budget takes comma-separated SM counts"):
            sm_budgets(bad)
    out = tmp_path / "rows.json"
    small = ["--preset", "mixtral-8x7b", "--hidden", "64", "--intermediate", "32", "--experts", "8", "--world", "2",
             "--tokens", "2", "--json", str(out)]
    assert main(["bench", "comm", *small, "--iters", "2", "--backend", "nccl_a2a,symm_a2a", "--symm-combine",
                 "push,pull", "--sm-budget", "1,all"]) == 0
    assert [r["backend"] for r in json.loads(out.read_text())["rows"]] == [
        "nccl_a2a", "symm_a2a sm1", "symm_a2a", "symm_a2a pull sm1", "symm_a2a pull"]
    assert main(["bench", "layer", *small, "--comm", "nccl_a2a,symm_a2a", "--runner", "reference",
                 "--sm-budget", "2,all"]) == 0
    assert [r["comm"] for r in json.loads(out.read_text())["rows"]] == ["nccl_a2a", "symm_a2a sm2", "symm_a2a"]
    capsys.readouterr()
    assert main(["bench", "comm", *small, "--sm-budget", "0"]) == 2
    assert "--sm-budget takes comma-separated SM counts >= 1 or 'all'" in capsys.readouterr().err
