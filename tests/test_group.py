import pytest
import torch

from epmoe.group import Placement, VirtualGroup, VirtualGroupError
from tests.dist import run_ranks


def _collectives(group, counts):
    """Exercise every RankGroup collective with rank-tagged rows; return what each rank got."""
    r, W = group.rank, group.world
    rows = torch.arange(counts[r], dtype=torch.float32)[:, None] + 100 * r  # [n_r, 1]
    padded = torch.full((max(counts), 1), -1.0)
    padded[: counts[r]] = rows
    every = group.all_gather(padded)  # [W, max count, 1]
    gathered = torch.cat([every[q, : counts[q]] for q in range(W)])
    # all_to_all_v: rank r sends (r + 1) rows to each rank j, tagged with 10*r + j
    send = [r + 1] * W
    recv = [j + 1 for j in range(W)]
    t = torch.cat([torch.full((r + 1, 2), float(10 * r + j)) for j in range(W)])
    a2a = group.all_to_all_v(t, send, recv)
    total = group.all_reduce(torch.tensor([float(r)]))
    ints = group.all_gather_ints([r, counts[r]])
    group.barrier()
    return gathered, a2a, total, ints


def _check(results, counts):
    W = len(counts)
    expect_gather = torch.cat([torch.arange(c, dtype=torch.float32)[:, None] + 100 * r for r, c in enumerate(counts)])
    for j, (gathered, a2a, total, ints) in enumerate(results):
        assert torch.equal(gathered, expect_gather)
        expect_a2a = torch.cat([torch.full((src + 1, 2), float(10 * src + j)) for src in range(W)])
        assert torch.equal(a2a, expect_a2a)
        assert float(total) == W * (W - 1) / 2
        assert ints == [[r, counts[r]] for r in range(W)]


COUNTS = {1: [3], 2: [0, 5], 3: [2, 0, 1], 4: [1, 4, 0, 2]}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_collectives_over_gloo(world):
    _check(run_ranks(_collectives, world, args=(COUNTS[world],)), COUNTS[world])


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_collectives_virtual_group_match_gloo_semantics(world):
    _check(VirtualGroup(world).run(lambda g: _collectives(g, COUNTS[world])), COUNTS[world])


def test_virtual_group_names_missing_rank_on_timeout():
    def body(g):
        if g.rank != 1:
            g.barrier()
        return g.rank

    with pytest.raises(VirtualGroupError, match=r"ranks \[1\] never arrived"):
        VirtualGroup(3, timeout=1.0).run(body)


def test_placement_contiguous():
    p = Placement.contiguous(12, 3)
    assert p.expert_rank.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert p.expert_local.tolist() == [0, 1, 2, 3] * 3
    assert p.global_ids(1).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="not divisible"):
        Placement.contiguous(10, 4)


def _declared(group):
    return group.backend, group.nodes, group.virtual


def test_groups_declare_backend_nodes_and_virtual():
    """Every RankGroup declares its transport, the hosts it spans and whether its ranks are
    threads of one process: the layer and the comm backends read them without probing."""
    assert run_ranks(_declared, 2) == [("gloo", 1, False)] * 2
    assert VirtualGroup(3).run(_declared) == [("virtual", 1, True)] * 3
    assert (VirtualGroup.backend, VirtualGroup.nodes, VirtualGroup.virtual) == ("virtual", 1, True)
