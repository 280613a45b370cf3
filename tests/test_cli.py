import json

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


def test_bench_layer_writes_table_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "layer.json", tmp_path / "layer.png"
    assert main(["bench", "layer", "--preset", "olmoe-1b-7b", "--tokens", "1,3",
                 "--json", str(out_json), "--plot", str(out_png)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["comm"], r["tokens"]) for r in rows] == [("none", 1), ("none", 3)]
    assert all(r["us"] > 0 and r["expert_roofline_us"] > 0 for r in rows)
    assert out_png.read_bytes()[:4] == b"\x89PNG"
