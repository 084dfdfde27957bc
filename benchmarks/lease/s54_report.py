"""Session 54's results file from its calls' unpacked $OUT folders (s53_callE.sh, s53_callF.sh, the five-document
run of `offload_variant five`): python3 benchmarks/lease/s54_report.py E_DIR F_DIR FIVE_DIR OUT.json"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def main() -> None:
    e, f, five, out = (Path(p) for p in sys.argv[1:5])
    prof = json.loads((e / "offload-bf16-profile.json").read_text())
    docs5 = json.loads((five / "offload-bf16-five.json").read_text())
    slot = json.loads((e / "slot_table.json").read_text())
    tests = {}
    for name, d in (("callE", e), ("callF", f)):
        log = (d / "cuda-tests.log").read_text()
        tests[name] = {"summary": [ln for ln in log.splitlines() if re.search(r"passed|failed", ln)][-1],
                       "failed": re.findall(r"^FAILED (\S+)", log, re.M)}
    bf = slot["shapes"]["bf16"]["new"]
    gath = {k.split("gather_1miss_gbps_")[1]: round(v, 1) for k, v in bf.items() if k.startswith("gather_1miss_gbps_")}
    runs = prof["docs"][0]["runs"]
    breakdown = {}
    for lab in ("lru/device", "lru+cpu/device"):
        r = runs[lab]
        t = r["time_per_token_s"]
        top = {k["kernel"][:40]: round(k["us_per_token"], 1) for k in r["profile"]["profiled"]["top"][:8]}
        breakdown[lab] = {"decode_tok_s": r["decode_tok_s"], "ms_per_token": t["total"] * 1e3,
                          "gpu_compute_ms": t["gpu_compute"] * 1e3, "copy_busy_ms": t["copy_busy"] * 1e3,
                          "rest_ms": (t["total"] - t["gpu_compute"] - t["copy_busy"]) * 1e3,
                          "gather_gbps": r["gather_gbps"], "mb_per_token": r["bytes_h2d_per_token"] / 1e6,
                          "warm_step_us_per_token": r["profile"]["timed"]["wall_us_per_token"],
                          "kernels_us_per_token_profiled": top}
    mean = docs5["mean"]
    summary = {
        "gather_1block_gbps_by_shape": gath,
        "copy_engine_gbps": {"1": bf["copy_engine_1miss_gbps"], "8": bf["copy_engine_8miss_gbps"]},
        "breakdown_csv": breakdown,
        "five_docs_mean": {lab: {"decode_tok_s": v["decode_tok_s"], "vs_serial_belady_bound": v["vs_serial_belady_bound"],
                                 "vs_combined_bound": v["vs_combined_bound"], "hit_rate": v["hit_rate"]}
                           for lab, v in mean.items()},
        "per_doc_vs_serial_belady": {d["doc"]: {lab: r["vs_serial_belady_bound"] for lab, r in d["runs"].items()}
                                     for d in docs5["docs"]},
        "tokens_identical_all_runs": docs5.get("tokens_identical_all_runs"),
        # every divergence is a CPU-expert run's, at a near-tie of the reference forward (its top-two gap)
        "divergence": {d["doc"]: {lab: {k: v[k] for k in ("position", "ref_forward_gap", "median_gap")}
                                  for lab, v in (d.get("divergence") or {}).items()} for d in docs5["docs"]},
        "cuda_tests": tests,
    }
    res = {"bench": "offload-profile", "date": "2026-12-07", "device": prof["device"], "session": 54,
           "commits": {"s53_callE": prof["commit"], "s53_callF": "df428ce", "five": docs5["commit"]},
           "shape": prof["shape"], "summary": summary,
           "raw": {"s53_callE/profile": prof, "s53_callE/slot_table": slot, "five": docs5}}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(summary, indent=1)[:6000])


if __name__ == "__main__":
    main()
