"""The Python examples in README.md run as written (in a temporary folder)."""

from __future__ import annotations

import re
from pathlib import Path

from curvlab import methods

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python examples"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))  # examples register
    namespace: dict = {}
    for block in blocks:  # later blocks build on earlier ones, as a reader would run them
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "cosine.pdf").is_file() and (tmp_path / "cosine.png").is_file()
