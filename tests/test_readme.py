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
