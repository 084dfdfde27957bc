"""tools/benchmeta.git_commit: the commit a benchmark result names, flagged when the tree differs from it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import benchmeta  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_commit_flags_a_modified_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("TIERED_COMMIT", raising=False)
    monkeypatch.setattr(benchmeta, "REPO", tmp_path)
    assert benchmeta.git_commit() == "unknown"  # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert benchmeta.git_commit() == head
    assert benchmeta.git_commit(short=True) == _git(tmp_path, "rev-parse", "--short", "HEAD")
    (tmp_path / "a.txt").write_text("two\n")  # the tree no longer what HEAD names
    assert benchmeta.git_commit() == head + "+modified"
    monkeypatch.setenv("TIERED_COMMIT", "abc1234")  # whoever sent the tree says which commit it is
    assert benchmeta.git_commit() == "abc1234"
