import json

import pytest
import torch

from epmoe.bench.core import bench, format_table, plot_time_vs_tokens, write_json
from epmoe.cli import main
from epmoe.config import preset_names

PNG = b"\x89PNG\r\n\x1a\n"


def _table(out: str) -> list[dict[str, str]]:
    """The rows of the (last) text table in `out`, as dicts of their cells."""
    lines = [[c.strip() for c in ln.split("|")[1:-1]] for ln in out.splitlines() if ln.startswith("|")]
    starts = [i for i, ln in enumerate(lines) if i + 1 < len(lines) and set(lines[i + 1][0]) == {"-"}]
    header = lines[starts[-1]]
    return [dict(zip(header, ln)) for ln in lines[starts[-1] + 2:]]


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
    (src,) = [ln for ln in lines if ln.strip().startswith("thresholds from")]  # said once, for every pick
    assert src.split("thresholds from", 1)[1].strip() == source
    for t in (1, 128, 4096):
        (line,) = [ln for ln in lines if ln.strip().startswith(f"{t} tokens")]
        pick = pick_comm(t, cands, ladder)
        assert f"-> {pick} (rule " in line
        limit = limits[pick]
        rule = line.split("(rule ", 1)[1].split(", after")[0].removesuffix(")")
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
    from epmoe.bench.plan import predict
    from epmoe.config import MoEConfig

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
    # the CPU defaults: the preset scaled down (the full one takes minutes per row), stated in the file
    assert {k: data["meta"]["config"][k] for k in ("hidden", "intermediate", "num_experts", "top_k")} == dict(
        hidden=256, intermediate=96, num_experts=16, top_k=8)
    assert "olmoe-1b-7b scaled to H=256, I=96, E=16" in out
    assert [(r["comm"], r["tokens"], r["world"], r["ranks"]) for r in rows] == [
        ("none", 1, 1, "one"), ("none", 3, 1, "one")]
    # the CPU: eager forward() timings, never set against a GPU's roofline
    assert all(r["us"] > 0 and r["timing"] == "eager" for r in rows)
    assert not any({"expert_roofline_us", "hbm_TBps", "TFLOPs"} & set(r) for r in rows)
    assert all(r["rates"].startswith("timed on the CPU: no roofline") for r in rows)
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    # the file feeds `epmoe plan --measured`: predicted at the measured (scaled) shapes, no time ratio
    assert main(["plan", "--measured", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "olmoe-1b-7b scaled to H=256, I=96, E=16" in out
    body = _table(out)
    assert [r["backend"] for r in body] == ["none", "none"] and all(r["ratio"] == "-" for r in body)
    assert all(float(r["predicted_us"]) == pytest.approx(predict(
        MoEConfig.from_preset("olmoe-1b-7b").scaled(256, 96, 16), 1, int(r["tokens"]), "none")["total_us"],
        rel=0.01) for r in body)


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


# ---- every command and flag of the README and --help, end to end on the CPU (scaled down) ----


def test_help_lists_every_command_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-h"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    for cmd in ("demo", "doctor", "bench", "plan"):
        assert f"epmoe {cmd}" in top
    assert "needs a CUDA GPU" in top  # bench experts, said before anything starts
    for cmd, shown in [("demo", "(default: qwen3-30b-a3b)"), ("bench", "(default: deepseek-v3)"),
                       ("plan", "(default: 450.0)"), ("doctor", "usage: epmoe doctor")]:
        with pytest.raises(SystemExit):
            main([cmd, "-h"])
        text = " ".join(capsys.readouterr().out.split())
        assert shown in text, cmd
    assert "(default: None)" not in text


@pytest.mark.parametrize(("preset", "features"), [
    ("deepseek-v3", ["grouped top-8: best 4 of 8 expert groups", "correction bias", "x2.5", "1 shared expert"]),
    ("minimax-m2.5", ["sigmoid top-8 picked with a correction bias"]),
    ("gpt-oss-120b", ["top-4 on the logits, softmax over the 4", "clamped SwiGLU", "biases b13/b2"]),
])
def test_demo_runs_every_preset_with_what_it_exercises(capsys, preset, features):
    assert main(["demo", "--preset", preset, "--tokens", "8", "--hidden", "64", "--intermediate", "32"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("exercises: ")]
    assert all(f in line for f in features), line
    body = _table(out)
    assert sorted(r["backend"] for r in body) == ["allgather", "nccl_a2a", "none", "symm_a2a"]
    assert all(r["ok"] == "yes" for r in body)


def test_demo_features_name_every_preset():
    from epmoe.cli import demo_features
    from epmoe.config import MoEConfig

    for name in preset_names():
        assert demo_features(MoEConfig.from_preset(name))


@pytest.mark.parametrize(("argv", "message"), [
    (["--world", "3"], "--world 3 does not divide the 16 experts"),
    (["--world", "9", "--experts", "18"], "--world 9 is out of range"),
    (["--preset", "deepseek-v3", "--experts", "12"], "not divisible by n_group=8"),
])
def test_demo_refuses_a_bad_world_with_one_message(capsys, argv, message):
    assert main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err + captured.out
    assert len(captured.err.strip().splitlines()) == 1


def test_doctor_prints_each_line_once(capsys):
    assert main(["doctor"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == len(set(lines))
    assert sum("thresholds from" in ln for ln in lines) == 1


@CPU_ONLY
def test_bench_comm_writes_json_and_plot_that_plan_reads(tmp_path, capsys):
    out_json, out_png, ladder = tmp_path / "comm.json", tmp_path / "comm.png", tmp_path / "crossovers.json"
    assert main(["bench", "comm", "--tokens", "1,4", "--iters", "2", "--json", str(out_json), "--plot", str(out_png),
                 "--store-crossovers", str(ladder)]) == 0
    out = capsys.readouterr().out
    assert "deepseek-v3 scaled to H=256, I=96, E=16" in out
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert data["meta"]["config"]["hidden"] == 256 and data["meta"]["world"] == 2
    assert {r["backend"] for r in rows} == {"allgather", "nccl_a2a", "symm_a2a", "symm_a2a pull"}
    assert all(r["round_trip_us"] > 0 and r["round_trip_us"] == pytest.approx(r["dispatch_us"] + r["combine_us"])
               for r in rows)
    assert out_png.read_bytes()[:8] == PNG
    assert json.loads(ladder.read_text())["cpu"]["2"][-1][0] is None  # the ladder of gloo ranks, W=2
    # bench comm's own default output: every row (symm_a2a pull too) predicted, bytes compared, no CPU time ratio
    assert main(["plan", "--measured", str(out_json)]) == 0
    body = _table(capsys.readouterr().out)
    assert [r["backend"] for r in body] == [r["backend"] for r in rows]
    assert all(r["predicted_us"] != "-" and r["ratio"] == "-" for r in body)
    assert all(float(r["predicted_MB"]) == pytest.approx(float(r["measured_MB"]), rel=0.05) for r in body)


@CPU_ONLY
def test_bench_comm_flags(tmp_path, capsys):
    out_json = tmp_path / "c.json"
    assert main(["bench", "comm", "--preset", "mixtral-8x7b", "--hidden", "128", "--experts", "8", "--world", "4",
                 "--tokens", "3", "--iters", "2", "--backend", "nccl_a2a,symm_a2a", "--payload", "fp8,nvfp4",
                 "--symm-combine", "pull", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["backend"], r["payload"], r["world"]) for r in rows] == [
        ("nccl_a2a", "fp8", 4), ("symm_a2a pull", "fp8", 4), ("nccl_a2a", "nvfp4", 4), ("symm_a2a pull", "nvfp4", 4)]
    assert main(["bench", "comm", "--static", "--backend", "allgather", "--tokens", "2", "--iters", "2",
                 "--json", str(out_json)]) == 0
    assert [r["backend"] for r in json.loads(out_json.read_text())["rows"]] == ["allgather static"]
    capsys.readouterr()
    assert main(["bench", "comm", "--world", "3"]) == 2
    assert "--world 3 does not divide the 16 experts" in capsys.readouterr().err


@CPU_ONLY
def test_bench_layer_flags(tmp_path, capsys):
    out_json = tmp_path / "l.json"
    assert main(["bench", "layer", "--preset", "gpt-oss-120b", "--hidden", "64", "--intermediate", "32",
                 "--world", "2", "--comm", "auto", "--tokens", "2", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["comm"], r["world"], r["ranks"]) for r in rows] == [("auto", 2, "gloo")]
    assert main(["bench", "layer", "--preset", "deepseek-v3", "--hidden", "64", "--intermediate", "32",
                 "--world", "2", "--comm", "nccl_a2a", "--runner", "reference", "--tokens", "2",
                 "--json", str(out_json)]) == 0
    assert [(r["comm"], r["runner"]) for r in json.loads(out_json.read_text())["rows"]] == [
        ("nccl_a2a", "reference")]
    capsys.readouterr()
    assert main(["bench", "layer", "--runner", "triton", "--tokens", "1"]) == 2  # triton runs on CUDA only
    assert "runner 'triton' runs on cuda, not cpu" in capsys.readouterr().err


@CPU_ONLY
def test_bench_on_the_cpu_refuses_what_it_cannot_run_before_starting(capsys, monkeypatch):
    import epmoe.cli as cli

    assert main(["bench", "experts"]) == 2
    err = capsys.readouterr().err
    assert "bench experts: needs a CUDA GPU" in err and "epmoe bench layer" in err
    monkeypatch.setattr(cli, "_available_bytes", lambda: 24 * 10**9)  # a 24 GB CPU box
    assert main(["bench", "layer", "--full"]) == 2
    err = capsys.readouterr().err
    assert "take 45.3 GB in fp32 per rank" in err and "--hidden/--intermediate/--experts" in err
    assert main(["bench", "layer", "--tokens", "-1"]) == 2
    assert "--tokens takes token counts >= 0" in capsys.readouterr().err
    assert main(["bench", "layer", "--tokens", "1,x"]) == 2
    assert "--tokens takes comma-separated integers, got '1,x'" in capsys.readouterr().err


def test_plot_of_nonpositive_or_missing_columns(tmp_path):
    rows = [{"backend": "a", "tokens": t, "us": 0.0, "x_us": float(t)} for t in (1, 2)]
    plot_time_vs_tokens(rows, tmp_path / "z.png", series="backend")  # zeros are left out, no crash
    assert (tmp_path / "z.png").read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match="no 'dispatch' column to plot"):
        plot_time_vs_tokens(rows, tmp_path / "z.png", series="backend", y="dispatch")
