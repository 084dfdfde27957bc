"""Session 57's results file from its calls' unpacked $OUT folders: the overlap part (s57_callD.sh, or F: the default
overlap against the down projection beside gate_up, TIERED_GATHER_OVERLAP=down, and CUDA tests) and the CPU-worker
part (s57_callG.sh, or F: the CPU-rate guard and the pinned worker team against neither, alternating, with CPU
experts; the committed file took call G's folder with call G2's g1b copied in, and G2's folder as the first):
python3 benchmarks/lease/s57_report.py OVERLAP_DIR CPU_DIR OUT.json   (a missing part is left out)"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from s55_report import _means, _tests  # (this folder is on sys.path when the script runs)
from s56_report import _ratio


def _load(d: Path, tag: str) -> dict | None:
    p = d / f"offload-bf16-{tag}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _cpu_rows(d: dict) -> dict:
    """Per document and CPU-expert run: tok/s, the ratio to the serial Belady bound, the worker's microseconds an
    expert, the take tables (load-time and last) and the guard's retunes."""
    out = {}
    for doc in d["docs"]:
        for lab, r in doc["runs"].items():
            c = r.get("device_cpu") or {}
            out[f"{doc['doc']} {lab}"] = {
                "tok_s": round(r["decode_tok_s"], 1), "vs_serial_belady": r.get("vs_serial_belady_bound"),
                "cpu_us_per_expert": round(1e6 * c["compute_s"] / max(c["experts"], 1), 1) if c.get("experts") else None,
                "take_load": c.get("take_load"), "take": c.get("take"), "retunes": c.get("retunes"),
                "pinned": c.get("pinned")}
    return out


def _spread(rows: list[dict]) -> dict:
    """Across the variant's processes (both rounds): each run's mean tok/s, the worker's us an expert (median,
    min, max) and the worst document."""
    out: dict = {}
    for lab in rows[0]["mean"]:
        us = [v["cpu_us_per_expert"] for d in rows for k, v in _cpu_rows(d).items()
              if k.endswith(" " + lab) and v["cpu_us_per_expert"]]
        toks = [r["decode_tok_s"] for d in rows for doc in d["docs"] for k, r in doc["runs"].items() if k == lab]
        out[lab] = {"mean_tok_s": round(statistics.mean(d["mean"][lab]["decode_tok_s"] for d in rows), 1),
                    "mean_vs_serial_belady": round(statistics.mean(d["mean"][lab]["vs_serial_belady_bound"]
                                                                   for d in rows), 4),
                    "worst_doc_tok_s": round(min(toks), 1),
                    "cpu_us_per_expert": {"median": statistics.median(us), "min": min(us), "max": max(us)} if us
                    else None}
    return out


def main() -> None:
    dd, ed, out = (Path(p) for p in sys.argv[1:4])
    summary: dict = {}
    raw: dict = {}
    dev = commit = shape = None
    gu, dn = _load(dd, "gu1"), _load(dd, "dn1")
    if gu and dn:
        summary["down_overlap_over_gate_up"] = _ratio(dn, gu)
        summary["three_docs_mean_gate_up"], summary["three_docs_mean_down"] = _means(gu), _means(dn)
        raw.update(gate_up=gu, down=dn)
        dev, commit, shape = gu["device"], gu["commit"], gu["shape"]
    if (dd / "cuda-tests.log").exists():
        summary["cuda_tests_call_d"] = _tests(dd)
    var = {t: v for t in ("g0a", "g1a", "p1a", "g0b", "g1b", "p1b") if (v := _load(ed, t)) is not None}
    if var:
        pairs = (("guard_over_neither", "g1", "g0"), ("pinned_guard_over_neither", "p1", "g0"),
                 ("pinned_guard_over_guard", "p1", "g1"))
        for name, x, y in pairs:  # per round (a, b) where both processes ran
            got = {r: _ratio(var[x + r], var[y + r])["mean"] for r in "ab" if x + r in var and y + r in var}
            if got:
                summary[name] = got
        names = {"g0": "neither", "g1": "guard", "p1": "pinned_guard"}
        summary["spread"] = {names[k]: _spread(rows) for k in names
                             if (rows := [var[k + r] for r in "ab" if k + r in var])}
        summary["per_doc"] = {t: _cpu_rows(v) for t, v in var.items()}
        raw.update(var)
        first = next(iter(var.values()))
        dev, commit, shape = dev or first["device"], commit or first["commit"], shape or first["shape"]
    if (ed / "cuda-tests.log").exists() and ed != dd:
        summary["cuda_tests_call_e"] = _tests(ed)
    for name in ("lscpu.txt", "nodes.txt", "topology.txt"):
        if (ed / name).exists():
            summary.setdefault("box", {})[name] = (ed / name).read_text()[:4000]
    res = {"bench": "offload-cpu-worker", "date": "2026-12-07", "device": dev, "session": 57, "commit": commit,
           "shape": shape, "summary": summary, "raw": raw}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("per_doc", "box")}, indent=1)[:6000])


if __name__ == "__main__":
    main()
