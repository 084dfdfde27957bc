"""Provenance for benchmark results: the commit a result was measured at."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_commit(short: bool = False) -> str:
    """TIERED_COMMIT (set by whoever sends the tree to a box), else git's HEAD, with "+modified" when the tracked
    files differ from it (session 53: the box's copy carried a .git at the last landed commit under a newer tree, and
    the results named that commit), else "unknown"."""
    if os.environ.get("TIERED_COMMIT"):
        return os.environ["TIERED_COMMIT"]
    args = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        return "unknown"
    d = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO, capture_output=True)
    return r.stdout.strip() + ("+modified" if d.returncode == 1 else "")


def write_out(res: dict, name: str) -> str:
    """The result as one JSON line; also written to $OUT/name when OUT is set (the GPU box brings $OUT back)."""
    line = json.dumps(res)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(line + "\n")
    return line
