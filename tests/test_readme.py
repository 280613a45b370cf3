"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README must hold a Python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102
    assert scope["y"].shape == scope["x"].shape
    assert (scope["y2"] - scope["y"]).abs().max() > 0  # replay used different weights
    assert scope["used"].shape == (16, scope["cfg"].top_k)


def test_readme_hugging_face_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 2, "README must hold the Hugging Face example"
    scope: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), scope)  # noqa: S102
    assert scope["names"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert (scope["after"] - scope["before"]).abs().max() < 1e-4


def test_readme_checkpoint_example_runs():
    """From a checkpoint folder (config.json + safetensors) to a layer, no config written by hand;
    the layer computes what the model's own MoE block does."""
    import torch

    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3, "README must hold the checkpoint example"
    scope: dict = {}
    exec(compile(blocks[2], "README.md", "exec"), scope)  # noqa: S102
    assert "MoEConfig.from_hf(folder)" in blocks[2] and "load_moe_layer(folder, cfg" in blocks[2]
    x, y, model = scope["x"], scope["y"], scope["model"]
    with torch.no_grad():
        want = model.model.layers[1].mlp(x[None])[0]
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_readme_command_lines_run(tmp_path, monkeypatch, capsys):
    """Every `epmoe ...` line of the README's bash blocks runs as written (on the CPU: scaled down)
    and writes the files it names."""
    import shlex

    import torch

    from epmoe.cli import main

    text = (Path(__file__).parent.parent / "README.md").read_text()
    lines = [ln.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
             for ln in block.splitlines() if ln.startswith("epmoe ")]
    assert any(ln.startswith("epmoe plan --measured") for ln in lines)
    if torch.cuda.is_available():
        return  # full-size presets on a GPU: the GPU tests time those
    monkeypatch.chdir(tmp_path)
    for line in lines:
        argv = shlex.split(line)[1:]
        if argv[0] == "bench" and "--tokens" not in argv:
            argv += ["--tokens", "1,4"]  # the CPU default tokens are 1,8,64: keep the suite short
        assert main(argv) == 0, line
        for name in re.findall(r"\S+\.(?:json|png)", line):
            assert (tmp_path / name).stat().st_size > 0, (line, name)
    capsys.readouterr()
