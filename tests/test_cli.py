import json

import pytest
import torch

from epmoe.bench.core import bench, format_table, plot_time_vs_tokens, write_json
from epmoe.cli import main


def test_demo_runs_every_backend_within_tolerance(capsys):
    assert main(["demo", "--tokens", "16", "--hidden", "64", "--intermediate", "32"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("|")]
    header, body = rows[0], rows[2:]
    assert header[0] == "backend" and "none" in [r[0] for r in body]
    assert all(r[header.index("ok")] == "yes" for r in body)


def test_doctor_reports_versions(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "comm backends" in out and "reference" in out


def test_doctor_names_the_ladder_rule_of_each_auto_pick(capsys):
    """For 1, 128 and 4096 tokens: the pick, the rung (threshold) that applied, and where the
    thresholds come from, consistent with select.pick_comm and select.crossovers."""
    from epmoe.select import Combo, comm_candidates, crossovers, pick_comm, pick_runner

    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = max(torch.cuda.device_count(), 2)
    combo = Combo(runner=pick_runner(device, "bf16"), layout="dp", world=world, device=device)
    cands = [n for n in comm_candidates(combo) if n != "none"]
    ladder, source = crossovers(torch.cuda.get_device_name(0) if device == "cuda" else "cpu", world)
    limits = {name: limit for limit, name in ladder}
    for t in (1, 128, 4096):
        (line,) = [ln for ln in lines if ln.strip().startswith(f"{t} tokens")]
        pick = pick_comm(t, cands, ladder)
        assert f"-> {pick} (rule " in line and f"thresholds from {source}" in line
        limit = limits[pick]
        rule = line.split("(rule ", 1)[1].split(";")[0]
        if limit is None:  # the open top rung: T above the rung before it
            assert rule.startswith("T > ") and t > int(rule.split()[2]) and rule.endswith(f"-> {pick}")
        else:
            assert f"T <= {limit} -> {pick}" in rule and t <= limit
    if ladder == [(512, "symm_a2a"), (None, "nccl_a2a")]:  # the defaults, when nothing is measured here
        assert [ln.split("-> ", 1)[1].split(" (")[0] for ln in lines if " tokens " in ln and "rule" in ln] == [
            "symm_a2a", "symm_a2a", "nccl_a2a"]
        assert any("rule T > 512 -> nccl_a2a" in ln for ln in lines)


def test_bench_helpers(tmp_path):
    x = torch.randn(64, 64)
    us = bench(lambda: x @ x, iters=5)
    assert us > 0
    rows = [{"backend": b, "tokens": t, "us": float(t * (i + 1))} for i, b in enumerate(["a", "b"]) for t in (1, 8, 64)]
    table = format_table(rows)
    assert table.splitlines()[0].split("|")[1].strip() == "backend" and len(table.splitlines()) == 8
    write_json(rows, tmp_path / "r.json", {"command": "test"})
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rows
    plot_time_vs_tokens(rows, tmp_path / "p.png", series="backend", roofline={1: 1.0, 64: 10.0})
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; GPU rows are tested below")


@CPU_ONLY
def test_bench_layer_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    import epmoe.bench.layer as layer_bench
    from epmoe.bench.plan import Links

    bars = []
    progress = layer_bench.progress
    monkeypatch.setattr(layer_bench, "progress", lambda items, desc: bars.append((desc, len(items))) or
                        progress(items, desc))
    out_json, out_png = tmp_path / "layer.json", tmp_path / "layer.png"
    assert main(["bench", "layer", "--preset", "olmoe-1b-7b", "--tokens", "1,3",
                 "--json", str(out_json), "--plot", str(out_png)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert bars == [("bench layer", 2)]
    assert data["meta"]["preset"] == "olmoe-1b-7b" and data["meta"]["world"] == 1  # no GPU: one rank
    assert [(r["comm"], r["tokens"], r["world"], r["ranks"]) for r in rows] == [
        ("none", 1, 1, "one"), ("none", 3, 1, "one")]
    # the CPU: eager forward() timings, roofline from the cost model's default rates
    assert all(r["us"] > 0 and r["expert_roofline_us"] > 0 and r["timing"] == "eager" for r in rows)
    assert all((r["hbm_TBps"], r["TFLOPs"]) == (Links().hbm_tbps, Links().tflops) for r in rows)
    assert "roofline from cost-model defaults (no GPU)" in out
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    # the file feeds `epmoe plan --measured`
    assert main(["plan", "--measured", str(out_json)]) == 0
    assert "ratio" in capsys.readouterr().out


def test_bench_layer_world_defaults_to_the_gpu_count(monkeypatch):
    from epmoe.bench.layer import default_world

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert default_world() == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_world() == 4


@CPU_ONLY
def test_bench_layer_on_gloo_ranks_is_eager_and_says_so():
    from epmoe.bench.layer import bench_layer

    rows = bench_layer("olmoe-1b-7b", [2], comm="nccl_a2a", world=2, iters=2)
    assert [(r["comm"], r["world"], r["ranks"], r["timing"]) for r in rows] == [("nccl_a2a", 2, "gloo", "eager")]


@pytest.mark.gpu
def test_bench_layer_on_a_gpu_replays_graphs_against_the_measured_roofline(tmp_path):
    """One GPU: W=1, the Triton runner captured by MoELayer.capture_graphs (timing "graph"),
    the roofline from HBM and matmul rates measured in the same run."""
    from epmoe.bench.layer import bench_layer

    rows = bench_layer("qwen3-30b-a3b", [1, 64], comm="none", world=1, iters=5)
    assert [(r["runner"], r["timing"], r["rates"]) for r in rows] == [("triton", "graph", "measured on this GPU")] * 2
    assert all(0.5 < r["hbm_TBps"] < 20 and 50 < r["TFLOPs"] < 5000 for r in rows)
    assert all(r["us"] >= 0.5 * r["expert_roofline_us"] for r in rows), "faster than the roofline: check the rates"
    out_json, out_png = tmp_path / "layer.json", tmp_path / "layer.png"
    assert main(["bench", "layer", "--preset", "qwen3-30b-a3b", "--tokens", "1,64",
                 "--json", str(out_json), "--plot", str(out_png)]) == 0
    assert json.loads(out_json.read_text())["meta"]["world"] == torch.cuda.device_count()
    assert out_png.read_bytes()[:4] == b"\x89PNG"
