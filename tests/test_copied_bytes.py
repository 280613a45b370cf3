"""Staging-copy accounting (the handles' dispatch_copied / combine_copied, `epmoe bench comm`'s
copied_bytes column) and the copy it removed (sum_in_rank_order's clone).

A hand-worked call on 2 gloo ranks, fp32 rows of H = 32, K = 2 of E = 4 experts (2 per rank),
3 tokens a rank: token 0 picks experts {0, 1} (rank 0 only), token 1 {2, 3} (rank 1 only),
token 2 {0, 2} (both ranks). Each rank sends 2 rows to each rank; a wire row is B = 32 * 4 + 2 * 4
+ 2 * 4 = 144 bytes (payload 128, ids and weights 16), a partial-sum row 128 bytes.
"""

from __future__ import annotations

import pytest
import torch

from epmoe import MoEConfig, Placement
from epmoe.comm import COMM_BACKENDS
from epmoe.comm.wire import sum_in_rank_order
from epmoe.routing import Routing
from tests.dist import run_ranks

CFG = MoEConfig(hidden=32, intermediate=16, num_experts=4, top_k=2)
IDS = [[0, 1], [2, 3], [0, 2]]
B, P, HC, T, W = 144, 128, 128, 3, 2

# nccl_a2a: pack T rows + one copy into the send buffer per rank (W T B), own 2 rows, unpack 4 rows' 16 bytes;
#           combine: own 2 rows back, then W gathers of T partial rows
# allgather (gloo: the all-to-all gather): pack T rows, repeat them W times, own chunk T rows, unpack 6 rows;
#           combine: own chunk T rows back
# symm_a2a: own slots of the 2 tokens with an expert here (128 bytes each), meta of every token (Kl * 8 = 16)
WANT = {
    "nccl_a2a": ((1 + W) * T * B + 2 * B + 4 * (B - P), 2 * HC + W * T * HC),
    "allgather": (T * B + W * T * B + T * B + 2 * T * (B - P), T * HC),
    "symm_a2a": (2 * P + T * 16, 0),
}


def copied_rank(group) -> dict:
    placement = Placement.contiguous(CFG.num_experts, group.world)
    x = torch.randn(T, CFG.hidden, generator=torch.Generator().manual_seed(group.rank))
    routing = Routing(torch.tensor(IDS, dtype=torch.int32), torch.full((T, 2), 0.5))
    out = {}
    for name in WANT:
        cls = COMM_BACKENDS[name]
        comm = cls(cfg=CFG, group=group, placement=placement, options=cls.make_options(), device="cpu",
                   dtype=torch.float32)
        d = comm.dispatch(x, routing)
        comm.combine(torch.zeros(d.num_pairs, CFG.hidden), d)
        out[name] = (d.handle.dispatch_copied, d.handle.combine_copied)
    return out


def test_copied_bytes_of_a_hand_worked_call():
    for rank, got in enumerate(run_ranks(copied_rank, W)):
        assert got == WANT, f"rank {rank}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ranks", [0, 1, 2, 3])
def test_sum_in_rank_order_adds_in_rank_order_without_a_copy(ranks, dtype):
    parts = torch.randn(ranks, 5, 7, dtype=torch.float32).to(dtype)
    want = torch.zeros(5, 7)
    for r in range(ranks):  # 0 + p == p: the sum the clone-and-add gave
        want = want + parts[r].float()
    got = sum_in_rank_order(parts)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    if ranks == 1 and dtype == torch.float32:
        assert got.data_ptr() == parts.data_ptr()  # nothing copied


def test_bench_comm_reports_copied_bytes():
    from epmoe.bench.comm import run_comm_bench

    rows = run_comm_bench(CFG.replace(num_experts=8), 2, [0, 4], "allgather,nccl_a2a,symm_a2a", iters=2)
    assert {r["backend"] for r in rows} == {"allgather", "nccl_a2a", "symm_a2a"}
    for r in rows:
        assert "copied_bytes" in r, r
        assert (r["copied_bytes"] > 0) == (r["tokens"] > 0), r
