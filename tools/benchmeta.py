"""Provenance for benchmark results: the commit a result was measured at."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_commit(short: bool = False) -> str:
    """TIERED_COMMIT (set by whoever sends the tree to a box without .git), else git, else "unknown"."""
    if os.environ.get("TIERED_COMMIT"):
        return os.environ["TIERED_COMMIT"]
    args = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"
