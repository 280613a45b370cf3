import time

import pytest
import torch

from tests.dist import DistError, DistTimeout, run_ranks


def _rank_sum(group, base):
    t = torch.tensor([float(group.rank + base)])
    group.all_reduce(t)
    return group.rank, float(t)


def _raise_on_rank1(group):
    if group.rank == 1:
        raise ValueError("boom on rank 1")
    return group.rank


def _stall_rank0(group):
    if group.rank == 0:
        time.sleep(30)
    return group.rank


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_run_ranks_returns_per_rank_results(world):
    out = run_ranks(_rank_sum, world, args=(10,))
    total = sum(10 + r for r in range(world))
    assert out == [(r, float(total)) for r in range(world)]


def test_error_names_rank_and_pool_recovers():
    with pytest.raises(DistError, match=r"ranks \[1\][\s\S]*boom on rank 1"):
        run_ranks(_raise_on_rank1, 2)
    assert run_ranks(_rank_sum, 2, args=(0,)) == [(0, 1.0), (1, 1.0)]


def test_timeout_names_missing_rank():
    # the pool's start-up (two processes importing torch: seconds on a loaded machine) is not part
    # of the call's 3 s: start the pool of this (world, timeout) first
    run_ranks(_rank_sum, 2, args=(0,), timeout=120, collective_timeout=3)
    start = time.monotonic()
    with pytest.raises(DistTimeout, match=r"ranks \[0\] did not finish"):
        run_ranks(_stall_rank0, 2, timeout=3, collective_timeout=3)
    assert time.monotonic() - start < 15
