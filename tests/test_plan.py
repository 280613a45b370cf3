import math

import pytest

from epmoe.bench.plan import Links, expected_ranks_hit, plan, predict
from epmoe.cli import main
from epmoe.config import MoEConfig


def test_expected_ranks_hit_by_hand():
    cfg = MoEConfig(hidden=8, intermediate=4, num_experts=8, top_k=2)
    # P(a rank holds neither expert) = C(6, 2) / C(8, 2) = 15 / 28
    assert expected_ranks_hit(cfg, 4) == pytest.approx(4 * 13 / 28)
    assert expected_ranks_hit(cfg, 1) == pytest.approx(1.0)
    assert expected_ranks_hit(cfg, 8) == pytest.approx(2.0)  # one expert per rank: always 2 ranks


def test_once_per_rank_moves_about_2_2x_fewer_rows_than_once_per_expert():
    ds = MoEConfig.from_preset("deepseek-v3")
    assert ds.top_k / expected_ranks_hit(ds, 4) == pytest.approx(2.2, abs=0.05)


def test_predictions_follow_bytes_and_limits():
    ds = MoEConfig.from_preset("deepseek-v3")
    links = Links()
    assert predict(ds, 16, 128, "symm_a2a", links) is None  # beyond one NVLink domain
    a2a = predict(ds, 8, 4096, "nccl_a2a", links)
    fp8 = predict(ds, 8, 4096, "nccl_a2a", links, payload="fp8")
    assert fp8["dispatch_MB"] < 0.6 * a2a["dispatch_MB"]
    # bytes of nccl_a2a dispatch at W=8: tokens * hit * (7/8 of hits elsewhere) * 2H
    hit = expected_ranks_hit(ds, 8)
    assert a2a["dispatch_MB"] == pytest.approx(4096 * hit * (1 - 1 / 8) * 2 * 7168 / 1e6)
    # crossing nodes costs more than staying on NVLink
    assert predict(ds, 16, 4096, "nccl_a2a", links)["dispatch_us"] > a2a["dispatch_us"]
    rows = plan(ds, [8, 64], [1, 4096])
    for w in (8, 64):
        for t in (1, 4096):
            assert sum(r["best"] == "*" for r in rows if r["gpus"] == w and r["tokens"] == t) == 1
    assert all(math.isfinite(r["total_us"]) for r in rows)
    with pytest.raises(ValueError, match="no cost model"):
        predict(ds, 8, 1, "carrier_pigeon", links)


def test_plan_cli(capsys):
    assert main(["plan", "--preset", "deepseek-v3", "--gpus", "8,16", "--tokens", "128"]) == 0
    assert "nccl_a2a" in capsys.readouterr().out
