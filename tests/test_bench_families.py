"""benchmarks/bench_families_gpu.py at CPU sizes: the pipeline runs, prints its table and one JSON line, and the
DeltaNet state of the 35B-A3B-shape model (shrunk) stays the same size from the short to the long prompt."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_families_small(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "benchmarks/bench_families_gpu.py", "--small", "--work", str(tmp_path / "w"),
                        "--families", "gpt_oss,deepseek_v3,qwen3_5_moe_35b", "--short-tokens", "40", "--long-tokens", "120",
                        "--tokens", "24"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "out" / "families_gpu.json").read_text())
    fams = res["families"]
    assert set(fams) == {"gpt_oss", "deepseek_v3", "qwen3_5_moe_35b_8L"}
    for f in fams.values():
        assert f["ok_pinned"] and f["rel_pinned_hf16"] <= 2e-2 and 0 <= f["flips"] <= 1
    p = res["prefill"]
    assert p["linear_state_constant"] and p["120"]["linear_state_bytes_after"] == p["40"]["linear_state_bytes"]
