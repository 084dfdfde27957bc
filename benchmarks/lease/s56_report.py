"""Session 56's results file from its calls' unpacked $OUT folders (s56_callA.sh: the next-use update on a stream of
its own against the step's stream, TIERED_NEXT_USE_STREAM; s56_callB.sh: session 55's form, then the down
projection beside gate_up, then the CPU posts on their own stream too, with --device-evict auto's default/tuned row,
and the CUDA tests):
python3 benchmarks/lease/s56_report.py NEXTUSE_DIR DOWN_DIR OUT.json"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from s55_report import _means, _tests  # (this folder is on sys.path when the script runs)


def _ratio(new: dict, old: dict) -> dict:
    """new over old: the five documents' mean tok/s and each document's."""
    mn, mo = _means(new), _means(old)
    return {"mean": {lab: round(mn[lab]["decode_tok_s"] / mo[lab]["decode_tok_s"], 4) for lab in mn},
            "per_doc": {d["doc"]: {lab: round(r["decode_tok_s"] / e["runs"][lab]["decode_tok_s"], 4)
                                   for lab, r in d["runs"].items()} for d, e in zip(new["docs"], old["docs"])}}


def _same_take(new: dict, old: dict) -> dict:
    """new over old per document and CPU-expert run, only where both processes got the same take table (the
    load-time probe's); with their CPU's achieved microseconds an expert."""
    out = {}
    for d, e in zip(new["docs"], old["docs"]):
        for lab, r in d["runs"].items():
            a, b = r.get("device_cpu") or {}, e["runs"][lab].get("device_cpu") or {}
            if a and b and a.get("take") == b.get("take"):
                out[f"{d['doc']} {lab}"] = {
                    "ratio": round(r["decode_tok_s"] / e["runs"][lab]["decode_tok_s"], 4), "take": a["take"],
                    "cpu_us_per_expert": [round(1e6 * c["compute_s"] / max(c["experts"], 1), 1) for c in (a, b)]}
    return out


def main() -> None:
    a, b, out = (Path(p) for p in sys.argv[1:4])
    nu0 = json.loads((a / "offload-bf16-nu0.json").read_text())
    nu1 = json.loads((a / "offload-bf16-nu1.json").read_text())
    gu = json.loads((b / "offload-bf16-gu.json").read_text())
    dn = json.loads((b / "offload-bf16-dn.json").read_text())
    al = json.loads((b / "offload-bf16-all.json").read_text())
    summary = {
        # call A: TIERED_NEXT_USE_STREAM=0 (the update between resolve and the gather, nt by its own add kernel)
        # against the default (its own stream, nt written by the update kernel); the lru runs are the control
        "next_use_stream_over_inline": _ratio(nu1, nu0),
        "five_docs_mean_next_use_stream": _means(nu1),
        "five_docs_mean_next_use_inline": _means(nu0),
        # call B (5c3f305), three fresh-process variants in turn: gu = session 55's form with the resident pairs
        # summed first (TIERED_GATHER_OVERLAP=gate_up, TIERED_CPU_POST_STREAM=0; the default since 214ac61), dn =
        # down beside gate_up with an acquire per pair (posts still in the step's stream), all = dn with the CPU
        # posts on a stream of their own. Both dn and all measured slower; the post stream was removed (a068139),
        # down beside gate_up became opt-in (TIERED_GATHER_OVERLAP=down) in a per-group form not yet run on a GPU.
        # The default and default/tuned rows carry CPU experts, whose take table and achieved rate moved between
        # processes (83-239 us an expert): compare documents with the same take table
        "down_overlap_over_gate_up_only": _ratio(dn, gu),
        "down_overlap_over_gate_up_only_same_take": _same_take(dn, gu),
        "post_stream_over_inline_same_take": _same_take(al, dn),
        "post_stream_over_inline": _ratio(al, dn),
        "defaults_over_session_55_form": _ratio(al, gu),
        "five_docs_mean_defaults": _means(al),
        "five_docs_mean_down_overlap_post_inline": _means(dn),
        "five_docs_mean_gate_up_only": _means(gu),
        "cuda_tests": {"s56_callA (device step; next-use stream)": _tests(a),
                       "s56_callB (every path the down overlap and --device-evict auto touch)": _tests(b)},
        "tokens_identical_all_runs": {k: v.get("tokens_identical_all_runs")
                                      for k, v in (("nu0", nu0), ("nu1", nu1), ("gu", gu), ("dn", dn), ("all", al))},
    }
    res = {"bench": "offload-nextuse", "date": "2026-12-07", "device": nu1["device"], "session": 56,
           "leases": {"s56_callA": nu1["device"], "s56_callB": al["device"] + " (another box)"},
           "commits": {"s56_callA": nu1["commit"], "s56_callB": al["commit"]},
           "shape": nu1["shape"], "summary": summary,
           "raw": {"nu0": nu0, "nu1": nu1, "gate_up_only": gu, "down_overlap_post_inline": dn, "defaults": al}}
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(summary, indent=1)[:6000])


if __name__ == "__main__":
    main()
