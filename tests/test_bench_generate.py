"""`epmoe bench generate` end to end on the CPU (scaled-down model): rows for HF and the patched model,
eager and static cache, JSON and PNG written, greedy tokens compared."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_bench_generate_writes_rows_json_and_plot(tmp_path, capsys):
    from epmoe.cli import main

    out, png = tmp_path / "gen.json", tmp_path / "gen.png"
    assert main(["bench", "generate", "--batch", "1,2", "--prompt", "4", "--new", "3", "--mode", "eager,static",
                 "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["impl"], r["mode"], r["batch"]) for r in rows] == [
        (impl, mode, b) for impl in ("hf", "epmoe") for mode in ("eager", "static") for b in (1, 2)]
    for r in rows:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0, r
        if r["impl"] == "epmoe":
            assert 0 <= r["agree"] <= 1 and r["decode_x"] > 0, r
    assert doc["meta"]["scaled_down"] and doc["meta"]["preset"] == "qwen3-30b-a3b"
    assert png.stat().st_size > 0
    assert "scaled-down model" in capsys.readouterr().out


def test_bench_generate_refuses_what_it_cannot_build(capsys):
    from epmoe.cli import main

    with pytest.raises(SystemExit, match="no transformers model for preset 'minimax-m2.5'"):
        main(["bench", "generate", "--preset", "minimax-m2.5"])
    with pytest.raises(SystemExit, match="--new must be >= 2"):
        main(["bench", "generate", "--new", "1"])


def test_bench_layer_host_rows(tmp_path):
    """`epmoe bench layer --host` on the CPU: host µs per call of the HF block, the patched block and the
    bare layer (graph replays only on a GPU)."""
    from epmoe.cli import main

    out = tmp_path / "host.json"
    assert main(["bench", "layer", "--host", "--preset", "olmoe-1b-7b", "--tokens", "1,8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert sorted({(r["impl"], r["tokens"]) for r in rows}) == sorted(
        (impl, t) for impl in ("hf block", "patched block", "layer eager") for t in (1, 8))
    assert all(r["host_us"] > 0 for r in rows)
