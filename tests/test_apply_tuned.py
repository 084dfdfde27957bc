"""tools/apply_tuned.py: a bench_quant_kernels.py result becomes TUNED entries of quant_moe.py; split > 1 (atomics)
and entries whose default is within 5% are skipped; the edited module loads and its pick_config returns the new
tiles, which override an existing entry for the same shape; applying twice changes nothing more."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _entry(kernel, fmt, k, n, *, split=1, within=False, algo=1, bn=8):
    c = {"bn": bn, "bg": 4, "warps": 4, "split": split, "conv": 1, "algo": algo}
    return {"config": c, "best_us": 10.0, "default_us": 20.0, "default_within_5pct": within,
            "tuned": f"({kernel!r}, {fmt!r}, {k}, {n}): QConfig(bn={bn}, bg=4, warps=4, split={split}, conv=1, "
                     f"algo={algo}),"}


def test_apply_tuned_edits_the_table(tmp_path):
    target = tmp_path / "quant_moe_copy.py"
    target.write_text((REPO / "tiered/kernels/quant_moe.py").read_text())
    res = {"commit": "x", "suggested": {
        "gate_up/q4/2048/768": _entry("gate_up", "q4", 2048, 768, bn=16),       # overrides an existing shape entry
        "down/q4/768/2048": _entry("down", "q4", 768, 2048, split=8),           # atomics: skipped
        "gemv/q8/4096/2048": _entry("gemv", "q8", 4096, 2048, within=True),     # default close enough: skipped
        "gemv/q4/1234/5678": _entry("gemv", "q4", 1234, 5678, bn=2, algo=0)}}
    (tmp_path / "r.json").write_text(json.dumps(res) + "\n")
    cmd = [sys.executable, str(REPO / "tools/apply_tuned.py"), str(tmp_path / "r.json"), "--target", str(target)]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert len(out["applied"]) == 2 and {s["key"] for s in out["skipped"]} == {"down/q4/768/2048", "gemv/q8/4096/2048"}
    spec = importlib.util.spec_from_file_location("quant_moe_copy", target)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quant_moe_copy"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules["quant_moe_copy"]
    assert mod.pick_config("gate_up", "q4", 2048, 768) == mod.QConfig(bn=16, bg=4, warps=4, split=1, conv=1, algo=1)
    assert mod.pick_config("gemv", "q4", 1234, 5678) == mod.QConfig(bn=2, bg=4, warps=4, split=1, conv=1, algo=0)
    from tiered.kernels.quant_moe import pick_config  # the repository's own table is untouched
    assert pick_config("down", "q4", 768, 2048).split == 1
    before = target.read_text()
    again = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert again["applied"] == [] and target.read_text() == before
