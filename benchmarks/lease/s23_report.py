"""Session 23: assemble benchmarks/results/offload-complete-2026-12-03-h200-s23.json (the complete table: once the
copy fill has landed a plan of every key, the steps look their slots up only; issue 13's offload goal) from the files
the lease calls brought back, unpacked under one folder per call (A-F: benchmarks/lease/s23_call*.sh). Every figure
is read from those files.

    python3 benchmarks/lease/s23_report.py /tmp/s23r benchmarks/results
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s19_report import MODEL, summary  # noqa: E402
from s20_report import offload  # noqa: E402
from s22_report import DEVICE, means, timeline_steps  # noqa: E402


def fill_stats(p: Path) -> dict:
    """Per run, the copy fill's stats and the complete steps."""
    d = json.loads(p.read_text().strip().splitlines()[-1])
    return {k: {**((r.get("device_fill") or {}).get("copy") or {}),
                "complete_steps": (r.get("device_fill") or {}).get("complete_steps")}
            for k, r in d["docs"][0]["runs"].items() if (r.get("device_fill") or {}).get("copy")}


def row(p: Path) -> dict:
    return {**offload(p), "fill": fill_stats(p)}


def timeline(p: Path) -> dict:
    """s22_report.timeline_steps, with the filling steps' and the later steps' counts."""
    steps, last, n = timeline_steps(p)
    return {**steps, "filling_steps": last, "after_the_fill_steps": n - last - 1}


def main(root: Path, out_dir: Path) -> None:
    A, B, C, D, E, F = (root / n for n in "ABCDEF")
    on = [row(A / "offload-layout-q4-on1.json"), row(B / "offload-layout-q4-on2.json")]
    off = [row(A / "offload-layout-q4-off1.json"), row(B / "offload-layout-q4-off2.json")]
    m_on, m_off = means(on, []), means(off, [])
    pair = {k: {"complete": m_on[k], "resolving": m_off[k],
                "complete_over_resolving": round(m_on[k]["decode_tok_s"] / m_off[k]["decode_tok_s"], 3)}
            for k in ("default", "default/tuned")}
    long_on, long_off = row(B / "offload-layout-q4-long.json"), row(B / "offload-layout-q4-longoff.json")
    run = json.loads((A / "run.err").read_text().strip().splitlines()[-1])
    run = run.get("stats", run)
    rds = run.get("device_step") or {}
    dq, db = row(D / "offload-layout-q4-q4.json"), row(D / "offload-bf16-bf16.json")
    eq = [row(E / "offload-layout-q4-e1.json"), row(E / "offload-layout-q4-e2.json")]
    eb = row(E / "offload-bf16-bf16.json")
    # every process's untuned default with the complete steps (A-E), for the goal's spread
    defaults = {"A": on[0], "B": on[1], "C": row(C / "offload-layout-q4-prof.json"), "D": dq, "E1": eq[0],
                "E2": eq[1]}
    ratios = {c: round(r["runs"]["default"]["vs_pcie_bound"], 4) for c, r in defaults.items()}
    tok = lambda r: r["runs"]["default"]["decode_tok_s"]  # noqa: E731
    e_q4 = statistics.mean(tok(r) for r in eq)
    fp = [row(F / f"offload-layout-q4-p{i}.json") for i in (1, 2)]
    fa = [row(F / f"offload-layout-q4-a{i}.json") for i in (1, 2)]
    m_p, m_a = means(fp, []), means(fa, [])
    res = {
        "bench": "bench_cpu_experts_gpu.py (offload_variant in benchmarks/lease/lib.sh): one eval document "
                 "(csv.py.txt), 127 decode tokens unless a row says 511, --vram-gb 4 (q4+q4: 1,024 slots, every "
                 "expert; bf16: 243), replayed routing, one fresh process per row set",
        "date": "2026-12-03", "session": 23, "device": DEVICE, "model": MODEL,
        "what": "The complete table: when the copy fill's plan holds every key not resident (plan_fill keeps no free "
                "slot for demand misses then), the table holds every MoE key once it has landed, and the steps "
                "after replay lookup-only graphs (no resolve, gather, CPU hand-off or prefetch: the router's "
                "softmax-top-k launch writes the slots, or one lookup reads a replayed routing's rows). Against the "
                "same code with TIERED_COMPLETE_STEP=0 (the resolving steps), in fresh processes. A (9377649): the "
                "tests on the GPU, `tiered run`, the first pair. B (9377649, warm): the second pair, 511 tokens, a "
                "timeline. C (ce3211a): the CUDA tests of five files, a profile of the complete step. D (ce3211a, "
                "warm): bf16 then q4. E (1667454): q4, bf16, q4, a timeline. F (07018d5): the filling steps of such a "
                "plan without resolve too (a planned key loads into its reserved slot in the lookup, the gather "
                "copies it; the default since) against TIERED_COMPLETE_STEP=after (A-E's default), two processes "
                "each, and the CUDA tests of the captured step with both routings.",
        "commits": {"A": "9377649", "B": "9377649", "C": "ce3211a", "D": "ce3211a", "E": "1667454", "F": "07018d5"},
        "q4_pairs": {"on1": on[0], "off1": off[0], "on2": on[1], "off2": off[1]},
        "q4_complete_against_resolving": pair,
        "q4_511_tokens": {"complete": long_on, "resolving": long_off,
                          "complete_over_resolving": round(tok(long_on) / tok(long_off), 3)},
        "timeline_steps": {c: timeline(d / "offload-layout-q4-tl.json") for c, d in (("B", B), ("E", E))},
        "timelines": {"B": offload(B / "offload-layout-q4-tl.json"), "E": offload(E / "offload-layout-q4-tl.json")},
        "profile_C": defaults["C"],
        # A-E's default (complete steps after the fill, resolve while it fills), every process
        "default_vs_pcie_bound_by_process": ratios,
        "default_vs_pcie_bound_mean": round(statistics.mean(ratios.values()), 4),
        "default_vs_pcie_bound_median": round(statistics.median(ratios.values()), 4),
        "F": {"p1": fp[0], "p2": fp[1], "a1": fa[0], "a2": fa[1],
              "planned_and_complete": m_p["default"], "complete_after_only": m_a["default"],
              "planned_over_after": round(m_p["default"]["decode_tok_s"] / m_a["default"]["decode_tok_s"], 3)},
        # the default since F (07018d5): lookups without resolve while the plan fills and after it has landed
        "final_default_vs_pcie_bound": [round(r["runs"]["default"]["vs_pcie_bound"], 4) for r in fp],
        "cuda_tests_F": summary(F / "cuda-tests.log"),
        "D": {"q4": dq, "bf16": db, "q4_vs_bf16_offload": round(tok(dq) / tok(db), 3)},
        "E": {"q4_e1": eq[0], "q4_e2": eq[1], "bf16": eb, "q4_vs_bf16_offload": round(e_q4 / tok(eb), 3)},
        # issue 13's ratio: the lower of the two same-call figures
        "q4_vs_bf16_offload": min(round(tok(dq) / tok(db), 3), round(e_q4 / tok(eb), 3)),
        "cuda_tests_A": summary(A / "cuda-tests.log"),
        "cuda_tests_C": summary(C / "cuda-tests.log"),
        "tiered_run_A": {k: run.get(k) for k in ("decode_graphs", "decode_tok_s")} | {
            "fill_copy": rds.get("fill_copy"), "steps": rds.get("steps"), "complete_steps": rds.get("complete_steps")},
        "reproduce": "bash benchmarks/lease/s23_call{A,B,C,D,E,F}.sh (carry .carry/shared), TIERED_COMMIT=<commit>; "
                     "then this script over the unpacked calls",
    }
    out = out_dir / "offload-complete-2026-12-03-h200-s23.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
