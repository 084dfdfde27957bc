"""Session 55's results file from its calls' unpacked $OUT folders (s54_callA.sh: the admission penalty 0.25 against
0.5; s55_callA.sh: the overlapped gather on and off; s55_callB.sh: the touched paths' CUDA tests and a profile;
s55_callC.sh: off and on in the other order, with the prefetch run; s55_callD.sh: the prefetch and next-use runs
after their kernels moved before the gather):
python3 benchmarks/lease/s55_report.py PENALTY_DIR OVERLAP_DIR PROFILE_DIR REVERSED_DIR PREFETCH_DIR OUT.json"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _tests(d: Path) -> dict:
    log = (d / "cuda-tests.log").read_text()
    return {"summary": [ln for ln in log.splitlines() if re.search(r"passed|failed", ln)][-1],
            "failed": re.findall(r"^FAILED (\S+)", log, re.M)}


def _means(d: dict) -> dict:
    return {lab: {k: v[k] for k in ("decode_tok_s", "vs_serial_belady_bound", "vs_combined_bound", "hit_rate")}
            for lab, v in d["mean"].items()}


def main() -> None:
    pen, ov, prof_dir, rev, pfd, out = (Path(p) for p in sys.argv[1:7])
    p25 = json.loads((pen / "offload-bf16-pen25.json").read_text())
    p50 = json.loads((pen / "offload-bf16-pen50.json").read_text())
    on = json.loads((ov / "offload-bf16-ov1.json").read_text())
    off = json.loads((ov / "offload-bf16-ov0.json").read_text())
    prof = json.loads((prof_dir / "offload-bf16-profile.json").read_text())
    on_b = json.loads((rev / "offload-bf16-ov1b.json").read_text())
    off_b = json.loads((rev / "offload-bf16-ov0b.json").read_text())
    pf_on = json.loads((pfd / "offload-bf16-pf1.json").read_text())
    pf_off = json.loads((pfd / "offload-bf16-pf0.json").read_text())
    m_on, m_off = _means(on), _means(off)
    mb_on, mb_off = _means(on_b), _means(off_b)
    mp_on, mp_off = _means(pf_on), _means(pf_off)

    def per_doc(a: dict, b: dict) -> dict:
        return {d["doc"]: {lab: round(r["decode_tok_s"] / e["runs"][lab]["decode_tok_s"], 4)
                           for lab, r in d["runs"].items()} for d, e in zip(a["docs"], b["docs"])}

    r = prof["docs"][0]["runs"]["lru/device"]
    summary = {
        "overlap_on_over_off_mean": {lab: round(m_on[lab]["decode_tok_s"] / m_off[lab]["decode_tok_s"], 4)
                                     for lab in m_on},
        "overlap_on_over_off_per_doc": per_doc(on, off),
        "reversed_order_on_over_off_mean": {lab: round(mb_on[lab]["decode_tok_s"] / mb_off[lab]["decode_tok_s"], 4)
                                            for lab in mb_on},
        "reversed_order_on_over_off_per_doc": per_doc(on_b, off_b),
        "five_docs_mean_reversed_on": mb_on,
        "five_docs_mean_reversed_off": mb_off,
        # call C ran the prefetch with its ids copy between the gather and gate_up (no overlap there: 0.995x); call D
        # (ae16ba8) with the next-use update and the copies before the gather, two documents
        "prefetch_after_reorder_on_over_off_mean": {lab: round(mp_on[lab]["decode_tok_s"] / mp_off[lab]["decode_tok_s"],
                                                               4) for lab in mp_on},
        "prefetch_after_reorder_on_over_off_per_doc": per_doc(pf_on, pf_off),
        "two_docs_mean_prefetch_on": mp_on,
        "two_docs_mean_prefetch_off": mp_off,
        "five_docs_mean_overlap_on": m_on,
        "five_docs_mean_overlap_off": m_off,
        "admit_penalty_0_25": _means(p25),
        "admit_penalty_0_5": _means(p50),
        "profile_lru_device_csv_overlap_on": {
            "warm_step_us_per_token": r["profile"]["timed"]["wall_us_per_token"],
            "kernels_us_per_token_profiled": {k["kernel"][:40]: round(k["us_per_token"], 1)
                                              for k in r["profile"]["profiled"]["top"][:8]},
            "note": "gate_up and down run beside the gather now (down launched early under PDL, waiting in its "
                    "griddepcontrol.wait): their kernel times include that wait, the wall time is the token's"},
        "cuda_tests": {"s54_callA (graph pool fix)": _tests(pen), "s55_callA (overlap, device step)": _tests(ov),
                       "s55_callB (touched paths)": _tests(prof_dir),
                       "s55_callD (prefetch and next-use after the reorder)": _tests(pfd)},
        "tokens_identical_all_runs": {"overlap_on": on.get("tokens_identical_all_runs"),
                                      "overlap_off": off.get("tokens_identical_all_runs")},
    }
    res = {"bench": "offload-overlap", "date": "2026-12-07", "device": on["device"], "session": 55,
           # four H100 leases: the penalty runs (s54_callA), the overlap calls A and B (one box), C, D
           "leases": {"s54_callA": p25["device"], "s55_callA+B": on["device"] + " (another box, warm for B)",
                      "s55_callC": on_b["device"] + " (a third box)", "s55_callD": pf_on["device"] + " (a fourth)"},
           "commits": {"s54_callA": p25["commit"], "s55_callA": on["commit"], "s55_callB": prof["commit"],
                       "s55_callC": on_b["commit"], "s55_callD": pf_on["commit"]},
           "shape": on["shape"], "summary": summary,
           "raw": {"pen25": p25, "pen50": p50, "overlap_on": on, "overlap_off": off, "profile": prof,
                   "reversed_off": off_b, "reversed_on": on_b, "prefetch_on": pf_on, "prefetch_off": pf_off}}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(summary, indent=1)[:5000])


if __name__ == "__main__":
    main()
