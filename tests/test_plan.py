import json
import math

import pytest

from epmoe.bench.plan import Links, compare, expected_ranks_hit, plan, predict, preset_of
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
    # bytes of nccl_a2a dispatch at W=8: tokens * hit * (7/8 of hits elsewhere) * wire row
    # (2H payload + K int32 ids + K fp32 weights); combine: the same rows of fp32 partial sums
    hit = expected_ranks_hit(ds, 8)
    assert a2a["dispatch_MB"] == pytest.approx(4096 * hit * (1 - 1 / 8) * (2 * 7168 + 8 * 8) / 1e6)
    assert a2a["combine_MB"] == pytest.approx(4096 * hit * (1 - 1 / 8) * 4 * 7168 / 1e6)
    bf16_combine = predict(ds, 8, 4096, "nccl_a2a", links, combine_bytes=2)
    assert bf16_combine["combine_MB"] == pytest.approx(a2a["combine_MB"] / 2)
    # symm_a2a: payload rows once per rank hit, plus every token's slot metadata on every other rank
    symm = predict(ds, 8, 4096, "symm_a2a", links)
    assert symm["dispatch_MB"] == pytest.approx((4096 * hit * 7 / 8 * 2 * 7168 + 4096 * 7 * 8 * 8) / 1e6)
    # allgather: every token to every other rank, each peer's partial rows back
    ag = predict(ds, 8, 4096, "allgather", links)
    assert (ag["dispatch_MB"], ag["combine_MB"]) == pytest.approx(
        (4096 * 7 * (2 * 7168 + 64) / 1e6, 4096 * 7 * 4 * 7168 / 1e6))
    # one rank, comm none: the expert stage alone
    one = predict(ds, 1, 128, "none", links)
    assert one["dispatch_us"] == one["combine_us"] == 0 and one["total_us"] == one["experts_us"] > 0
    assert predict(ds, 8, 128, "none", links) is None
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
    out = capsys.readouterr().out
    assert "nccl_a2a" in out and "hbm_tbps=4.2" in out and "partial sums 4 bytes" in out
    assert main(["plan", "--gpus", "8", "--tokens", "4096", "--hbm-tbps", "2.1", "--tflops", "395",
                 "--combine-bytes", "2"]) == 0
    assert "hbm_tbps=2.1, tflops=395.0" in capsys.readouterr().out


def test_expert_stage_follows_hbm_and_tflops_options():
    ds = MoEConfig.from_preset("deepseek-v3")
    fast, slow = Links(), Links(hbm_tbps=2.1, tflops=395.0)
    for t in (1, 65536):  # bandwidth-bound decode, compute-bound prefill
        ratio = predict(ds, 8, t, "nccl_a2a", slow)["experts_us"] / predict(ds, 8, t, "nccl_a2a", fast)["experts_us"]
        assert ratio == pytest.approx(2.0, rel=1e-3)


def test_nvfp4_prefill_adds_the_scratch_decode_pass():
    """From 128 rows per local expert the runner decodes every local expert to bf16 first: 2.5625
    bytes a value more at HBM rate; below that nvfp4 streams its own weight bytes once per sorted
    block of up to 32 rows."""
    q = MoEConfig.from_preset("qwen3-30b-a3b")  # 128 experts, top-8
    links = Links()
    values = 128 * 3 * q.hidden * q.intermediate
    prefill = predict(q, 1, 2048, "none", links, weights="nvfp4")["experts_us"]  # 128 rows per expert
    flops_us = 6 * q.hidden * q.intermediate * 2048 * 8 / (links.tflops * 1e6)
    decode_pass = values * (0.5 + 1 / 16 + 2.0) / (links.hbm_tbps * 1e6)
    assert prefill == pytest.approx(max(values * (0.5 + 1 / 16) / (links.hbm_tbps * 1e6), flops_us) + decode_pass)
    below = predict(q, 1, 1024, "none", links, weights="nvfp4")["experts_us"]  # 64 rows: two blocks of 32
    flops_us = 6 * q.hidden * q.intermediate * 1024 * 8 / (links.tflops * 1e6)
    assert below == pytest.approx(max(2 * values * (0.5 + 1 / 16) / (links.hbm_tbps * 1e6), flops_us))
    assert below < decode_pass


COMM_ROW = {  # as `epmoe bench comm --json` writes it (2 ranks, fp32 activations on gloo)
    "backend": "nccl_a2a", "payload": "float32", "world": 2, "tokens": 16, "ranks": "gloo", "timing": "cpu",
    "dispatch_us": 1500.0, "combine_us": 500.0, "dispatch_bytes": 132096, "combine_bytes": 131072,
}
LAYER_ROWS = [  # as `epmoe bench layer --json` writes them
    {"comm": "symm_a2a", "runner": "triton", "world": 8, "ranks": "nccl", "tokens": 128, "us": 300.0,
     "timing": "graph", "hbm_TBps": 2.1, "TFLOPs": 395.0, "rates": "measured on this GPU"},
    {"comm": "auto", "runner": "triton", "world": 8, "ranks": "nccl", "tokens": 128, "us": 250.0,
     "timing": "eager", "hbm_TBps": 2.1, "TFLOPs": 395.0, "rates": "measured on this GPU"},
]


def test_compare_sets_predictions_next_to_measured_rows():
    olmoe, ds = MoEConfig.from_preset("olmoe-1b-7b"), MoEConfig.from_preset("deepseek-v3")
    (row,) = compare(olmoe, [COMM_ROW])
    p = predict(olmoe, 2, 16, "nccl_a2a", payload="float32")
    assert row["predicted_us"] == pytest.approx(p["dispatch_us"] + p["combine_us"])
    # timed on the CPU (gloo): no time ratio against a GPU's links
    assert row["ratio"] == "-" and "gloo" in row["note"] and "no time ratio" in row["note"]
    # OLMoE at W=2: nearly every token hits both ranks, so the byte model meets the measured bytes
    assert row["predicted_MB"] == pytest.approx(row["measured_MB"], rel=0.01)
    # rows of GPU ranks get the ratio; configuration labels are predicted as their backend
    for label, backend in (("nccl_a2a", "nccl_a2a"), ("symm_a2a pull", "symm_a2a"), ("nccl_a2a static", "nccl_a2a"),
                           ("symm_a2a (virtual x2) pull", "symm_a2a")):
        gpu_row = {**COMM_ROW, "backend": label, "payload": "bfloat16", "ranks": "nccl", "timing": "graph"}
        (row,) = compare(olmoe, [gpu_row])
        p = predict(olmoe, 2, 16, backend, payload="bfloat16")
        assert row["backend"] == label and row["predicted_us"] == pytest.approx(p["dispatch_us"] + p["combine_us"])
        assert row["ratio"] == pytest.approx(2000.0 / row["predicted_us"])
    symm, auto = compare(ds, LAYER_ROWS)
    measured_links = Links(hbm_tbps=2.1, tflops=395.0)
    assert symm["predicted_us"] == pytest.approx(predict(ds, 8, 128, "symm_a2a", measured_links)["total_us"])
    best = min(predict(ds, 8, 128, b, measured_links)["total_us"] for b in ("symm_a2a", "nccl_a2a", "allgather"))
    assert auto["predicted_us"] == pytest.approx(best) and auto["what"] == "layer (auto; model: symm_a2a)"
    # explicit rates win over the row's
    (default_rates,) = compare(ds, LAYER_ROWS[:1], use_row_rates=False)
    assert default_rates["predicted_us"] == pytest.approx(predict(ds, 8, 128, "symm_a2a")["total_us"])
    assert preset_of({"command": "epmoe bench comm --preset olmoe-1b-7b --tokens 1"}) == "olmoe-1b-7b"
    assert preset_of({"preset": "deepseek-v3", "command": "epmoe bench layer"}) == "deepseek-v3"


def test_plan_measured_cli(tmp_path, capsys):
    path = tmp_path / "layer.json"
    path.write_text(json.dumps({"meta": {"command": "epmoe bench layer --preset deepseek-v3", "device": "x"},
                                "rows": LAYER_ROWS}))
    assert main(["plan", "--measured", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("|")]
    header, body = lines[0], lines[2:]
    assert {"predicted_us", "measured_us", "ratio"} <= set(header) and len(body) == 2
    first = dict(zip(header, body[0], strict=True))
    assert float(first["measured_us"]) == 300.0
    assert float(first["ratio"]) == pytest.approx(300.0 / float(first["predicted_us"]), rel=0.01)


def test_plan_one_gpu_has_a_none_row_and_no_latency_for_zero_bytes(capsys):
    ds = MoEConfig.from_preset("deepseek-v3")
    rows = plan(ds, [1], [1, 128])
    for t in (1, 128):
        group = [r for r in rows if r["tokens"] == t]
        assert group[0]["backend"] == "none" and group[0]["best"] == "*"
        assert all(r["dispatch_us"] == r["combine_us"] == 0 and r["dispatch_MB"] == 0 for r in group)
        assert len({r["total_us"] for r in group}) == 1
    assert predict(ds, 8, 0, "nccl_a2a")["dispatch_us"] == 0  # no token: nothing to wait for
    assert main(["plan", "--gpus", "1", "--tokens", "1"]) == 0
    assert "|      none |    1 |" in capsys.readouterr().out


def test_plan_measured_says_when_flags_conflict_with_the_file(tmp_path, capsys):
    path = tmp_path / "layer.json"
    path.write_text(json.dumps({"meta": {"command": "epmoe bench layer --preset deepseek-v3", "device": "x"},
                                "rows": LAYER_ROWS}))
    assert main(["plan", "--measured", str(path), "--preset", "qwen3-30b-a3b"]) == 2
    assert "--preset qwen3-30b-a3b conflicts with --measured" in capsys.readouterr().err
    assert main(["plan", "--measured", str(path), "--gpus", "1"]) == 2
    assert "its rows were measured at world 8" in capsys.readouterr().err
    assert main(["plan", "--measured", str(path), "--gpus", "8", "--preset", "deepseek-v3", "--tokens", "128"]) == 0
    capsys.readouterr()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plan", "--measured", str(bad)]) == 2
    assert "not a file written by `epmoe bench" in capsys.readouterr().err
