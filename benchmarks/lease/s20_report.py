"""Session 20: assemble benchmarks/results/offload-fill-share-2026-12-02-h200-s20.json (the background fill's pace,
order and copy shape, q4+q4 at --vram-gb 4 with replayed routing; issue 13's offload goal) from the files the lease
calls brought back, unpacked under one folder per call (A-E: benchmarks/lease/s20_call*.sh). Every figure is read
from those files.

    python3 benchmarks/lease/s20_report.py /tmp/s20r benchmarks/results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s19_report import DEVICE, MODEL, summary, offload as s19_offload  # noqa: E402

TL_KEYS = ("steps", "first_fill_step", "last_fill_step", "fill_steps", "mean_us_filling", "mean_us_rest",
           "misses_filling", "misses_rest", "mean_us")


def offload(p: Path) -> dict:
    """One bench_cpu_experts_gpu.py invocation: s19_report's rows (tok/s, hit rate, the bounds' ratios, the fill's
    pace), the resident step and link rate, and per run, with --timeline, its summary (the per-step lists stay in the
    call's files) and with --profile, the warm step's phases and top kernels."""
    d = json.loads(p.read_text().strip().splitlines()[-1])
    doc = d["docs"][0]
    base = s19_offload(p)
    base.pop("commit")  # (the box's base commit: main records each call's own)
    out = {**base, "resident_decode_tok_s": round(d["resident"]["decode_tok_s"], 1),
           "pcie_gbps": doc["links"]["lru/off"]["pcie_gbps"]}
    for k, r in doc["runs"].items():
        v = out["runs"][k]
        if r.get("timeline"):
            v["timeline"] = {x: r["timeline"].get(x) for x in TL_KEYS}
        if r.get("profile"):
            v["profile"] = {ph: {x: (r["profile"].get(ph) or {}).get(x) for x in
                                 ("wall_us_per_token", "misses", "kernels_per_token", "kernel_us_per_token")}
                            for ph in ("timed", "timed_idle", "profiled")}
            v["profile"]["top"] = (r["profile"].get("profiled") or {}).get("top", [])[:12]
    return out


def main(root: Path, out_dir: Path) -> None:
    A, B, C, D, E = (root / n for n in "ABCDE")
    q = lambda c, tag: offload(c / f"offload-layout-q4-{tag}.json")  # noqa: E731
    res = {
        "bench": "bench_cpu_experts_gpu.py (offload_variant in benchmarks/lease/lib.sh): one eval document "
                 "(csv.py.txt), 127 decode tokens unless a row says 511, --vram-gb 4, replayed routing",
        "date": "2026-12-02", "session": 20, "device": DEVICE, "model": MODEL,
        "what": "Why --device-fill auto trailed a fixed N, and the fill's share of a step. A (4f18f4b): the timeline "
                "(--timeline) of the default, a fixed 6 and 6 with 16 copy programs; the headline rows; the default "
                "under TIERED_FILL_SHARE=0.9; 512-token runs. B (ee2ab63, TIERED_FILL_GATHER): the fill "
                "copy's shape, and the warm step profiled. C (017f47f): N swept with the timeline (popularity order), the "
                "default on an untuned and a tuned layout, the demand gather's programs (TIERED_GATHER_CTAS). D "
                "(66c1f8e, FILL_SHARE 0.9): the final rows, q4 and bf16. E (fc1de49): auto's first window at steps 2-3 "
                "instead of 4-6 (not kept: the final commit times steps 4-6 again, as D), and the CLI's hint.",
        "findings": [
            "The default row's layout has no fitted router history, so its fill goes in expert-id order: 88-112 "
            "misses while filling against 25 for a fixed 6 in popularity order (A, C timelines). `default/tuned` "
            "(the same defaults on a layout `tiered tune --fit-trace` fitted, here on fit/) fills by popularity.",
            "N swept from the first step (C, timeline on): 4 / 5 / 6 / 7 = 2,186.7 / 2,233.5 / 2,290.5 / 2,325.9 "
            "tok/s; 6-8 a plateau in A, C, D. FILL_SHARE 0.75 gave 5 at a 420 us step; 0.9 gives 7 (6 after a "
            "retune, D).",
            "The filling steps take 453-460 us against 404-406 after (a fixed 6): about 17 us of the fill's own "
            "graph (B's profile: 397.7 us a warm step with the fill graph and nothing to fill, 381.1 without it), "
            "the misses' spikes (25 misses, about 15 us a step) and the copies beside compute.",
            "The copy's shape (B): 4 warps, 1,024-word loads, 32 programs stays best; thinner (1-2 warps) or "
            "fatter (8-16 warps on 16 or 8 programs) copies made the filling steps 5-315 us longer.",
            "The demand gather's programs (C): 132 matched the default 528 within noise (2,307 against 2,290-2,360 "
            "for fill 6; 1,999 against 2,019 fill off); 64 and 32 were slower. Unchanged.",
        ],
        "A": {t: q(A, t) for t in ("timeline", "base", "share09", "long")},
        "B": {t: q(B, t) for t in ("tl-base", "tl-w1b256", "tl-w1b512", "tl-w2b512", "tl-w8b1024", "tl-w16b1024",
                                   "tl-w1b256x132", "prof")},
        "C": {t: q(C, t) for t in ("sweep", "ctas132", "ctas64", "ctas32", "head", "long")},
        "D": {**{t: q(D, t) for t in ("head", "long")}, "bf16": offload(D / "offload-bf16-head.json"),
              "cuda_tests": summary(D / "cuda-tests.log")},
        "E": {**{t: q(E, t) for t in ("head", "long")}, "cuda_tests": summary(E / "cuda-tests.log"),
              "auto_first_window": "steps 2-3 (skip 1, first 2); not kept",
              "cli_hint": [ln for ln in (E / "cli.log").read_text().splitlines() if "expert-id order" in ln]},
    }
    for c, tags in (("B", {"tl-w1b256": "1:256:4 x64", "tl-w1b512": "1:512:4 x32", "tl-w2b512": "2:512:4 x32",
                           "tl-w8b1024": "8:1024:4 x16", "tl-w16b1024": "16:1024:4 x8",
                           "tl-w1b256x132": "1:256:4 x132", "tl-base": "4:1024:4 x32"}),):
        for t, shape in tags.items():
            res[c][t]["fill_gather"] = shape
    for t in ("ctas132", "ctas64", "ctas32"):
        res["C"][t]["demand_gather_ctas"] = int(t[4:])
    res["A"]["share09"]["fill_share"] = 0.9
    # the device box's copy of the tree reports its base commit (fc50d5b) to git_commit(): each call's commit is
    # the one its script was committed in
    for c, commit in (("A", "4f18f4b"), ("B", "ee2ab63"), ("C", "017f47f"), ("D", "66c1f8e"), ("E", "fc1de49")):
        res[c]["commit"] = commit
    h, lg, bf = res["D"]["head"]["runs"], res["D"]["long"]["runs"], res["D"]["bf16"]["runs"]
    res["goals"] = {"vs_pcie_bound": 0.85, "q4_vs_bf16_offload": 2.5}
    res["results"] = {
        "commit": "66c1f8e",
        "vs_pcie_bound_default": h["default"]["vs_pcie_bound"],
        "vs_pcie_bound_default_tuned": h["default/tuned"]["vs_pcie_bound"],
        "vs_pcie_bound_best_fixed": max((r["vs_pcie_bound"], k) for k, r in h.items() if "+fill" in k),
        "vs_pcie_bound_fill_off": h["lru/device"]["vs_pcie_bound"],
        "vs_pcie_bound_default_511_tokens": lg["default"]["vs_pcie_bound"],
        "vs_pcie_bound_default_tuned_511_tokens": lg["default/tuned"]["vs_pcie_bound"],
        "q4_vs_bf16_offload": h["default"]["decode_tok_s"] / bf["default"]["decode_tok_s"],
        "q4_vs_bf16_offload_tuned": h["default/tuned"]["decode_tok_s"] / bf["default/tuned"]["decode_tok_s"],
        "default_over_fill_off": h["default"]["decode_tok_s"] / h["lru/device"]["decode_tok_s"],
    }
    out = out_dir / "offload-fill-share-2026-12-02-h200-s20.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(out, json.dumps(res["results"], indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
