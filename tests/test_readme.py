"""The README's Python example does what it says: it streams the continuation as one text, not a token per line."""
from __future__ import annotations

import re

from conftest import REPO


def test_python_example_streams_the_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the embedded model is repacked into a fresh cache
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    printed = capsys.readouterr().out
    assert len(scope["out"].token_ids) == 32
    assert printed == scope["out"].text
    assert scope["logits"].shape[0] == len(scope["engine"].encode("import os"))
