"""Session 58's results file from its calls' unpacked $OUT folders (s58_callA.sh, s58_callB.sh: call B's folder may
be absent): the SMs' reads of pinned RAM (bench_h2d_read.py) and, bf16 at --vram-gb 4 with replayed routing, the
demand gather through TMA (tma / tmb) and the down projection beside gate_up (dna / dnb) against the default
(gua / gub), per round where both processes ran:
python3 benchmarks/lease/s58_report.py CALL_A_DIR [CALL_B_DIR] OUT.json"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from s55_report import _means, _tests  # (this folder is on sys.path when the script runs)
from s56_report import _ratio


def _load(d: Path | None, name: str) -> dict | None:
    try:
        return json.loads((d / name).read_text()) if d else None
    except (OSError, ValueError):
        return None


def _take(d: dict) -> dict:
    """Per document and CPU-expert run: the take table the run kept, its load-time one and the worker's us an
    expert (the probe windows' outcome shows in take_load)."""
    out = {}
    for doc in d["docs"]:
        for lab, r in doc["runs"].items():
            c = r.get("device_cpu") or {}
            if c:
                out[f"{doc['doc']} {lab}"] = {
                    "take_load": c.get("take_load"), "take": c.get("take"), "retunes": c.get("retunes"),
                    "cpu_us_per_expert": round(1e6 * c["compute_s"] / max(c["experts"], 1), 1)
                    if c.get("experts") else None}
    return out


def main() -> None:
    args = [Path(p) for p in sys.argv[1:]]
    a, out = args[0], args[-1]
    b = args[1] if len(args) == 3 else None
    summary: dict = {}
    raw: dict = {}
    h2d = _load(a, "h2d_read.json")
    if h2d:
        summary["h2d_read"] = {"figures": h2d["figures"], "errors": h2d["errors"]}
        raw["h2d_read"] = h2d
    pick = (a / "tma-pick.txt").read_text().strip() if (a / "tma-pick.txt").exists() else None
    runs = {t: v for t, d in (("gua", a), ("tma", a), ("dna", a), ("dnb", b), ("tmb", b), ("gub", b))
            if (v := _load(d, f"offload-bf16-{t}.json")) is not None}
    summary["tma_box"] = pick
    for name, x, y in (("tma_over_default", "tm", "gu"), ("down_over_default", "dn", "gu")):
        got = {}
        for r in "ab":
            xt = {"tm": "tma" if r == "a" else "tmb"}.get(x, x + r)
            if xt in runs and y + r in runs:
                got[r] = _ratio(runs[xt], runs[y + r])
        if got:
            summary[name] = got
    summary["means"] = {t: _means(v) for t, v in runs.items()}
    summary["take"] = {t: _take(v) for t, v in runs.items()}
    for d, k in ((a, "cuda_tests_call_a"), (b, "cuda_tests_call_b")):
        if d and (d / "cuda-tests.log").exists():
            summary[k] = _tests(d)
    if (a / "lscpu.txt").exists():
        summary["box"] = {"lscpu.txt": (a / "lscpu.txt").read_text()[:4000]}
    raw.update(runs)
    first = next(iter(runs.values()), None) or h2d or {}
    res = {"bench": "offload-gather", "date": "2026-12-07", "device": first.get("device"), "session": 58,
           "commit": first.get("commit"), "shape": first.get("shape"), "summary": summary, "raw": raw}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("take", "box")}, indent=1)[:8000])


if __name__ == "__main__":
    main()
