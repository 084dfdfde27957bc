"""Session 22: assemble benchmarks/results/offload-fill-copy-2026-12-03-h200-s22.json (the copy-engine fill,
--device-fill copy, against the gather fill; issue 13's offload goal) from the files the lease calls brought back,
unpacked under one folder per call (A-D: benchmarks/lease/s22_call*.sh). Every figure is read from those files.

    python3 benchmarks/lease/s22_report.py /tmp/s22r benchmarks/results
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s19_report import MODEL, summary  # noqa: E402
from s20_report import offload  # noqa: E402

DEVICE = "NVIDIA H200 (nvidia-h200 lease)"


def copy_stats(p: Path) -> dict:
    """Per run, the copy fill's stats (blocks planned and landed, batch, depth, seconds to land them all)."""
    d = json.loads(p.read_text().strip().splitlines()[-1])
    return {k: (r.get("device_fill") or {}).get("copy") for k, r in d["docs"][0]["runs"].items()
            if (r.get("device_fill") or {}).get("copy")}


def timeline_steps(p: Path) -> tuple[dict, int, int]:
    """The default's timeline (--timeline default): the first step, the filling steps with and without a demand
    miss, and the steps after the fill; with the last filling step and the step count."""
    t = json.loads(p.read_text().strip().splitlines()[-1])["docs"][0]["runs"]["default"]["timeline"]
    us, m = t["step_us"], t["misses"]
    last = t["last_fill_step"]
    filling = range(1, last + 1)
    quiet = [us[i] for i in filling if m[i] == 0]
    missed = [i for i in filling if m[i] > 0]
    return ({"first_step_us": us[0], "filling_steps_without_a_miss": len(quiet),
             "their_mean_us": round(statistics.mean(quiet), 1), "steps_with_misses": len(missed),
             "their_misses": sum(m[i] for i in missed),
             "their_mean_us_with_misses": round(statistics.mean(us[i] for i in missed), 1),
             "after_the_fill_mean_us": round(statistics.mean(us[last + 1:]), 1)}, last, len(us))


def means(calls: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """Mean tok/s and PCIe-bound ratio of each label over the processes, and the ratios `pairs` names (a over b)."""
    out: dict = {}
    labels = sorted({k for c in calls for k in c["runs"]})
    for k in labels:
        rows = [c["runs"][k] for c in calls if k in c["runs"]]
        out[k] = {"n": len(rows), "decode_tok_s": round(statistics.mean(r["decode_tok_s"] for r in rows), 1),
                  "vs_pcie_bound": round(statistics.mean(r["vs_pcie_bound"] or 0 for r in rows), 4),
                  "hit_rate": round(statistics.mean(r["hit_rate"] for r in rows), 4)}
    out["ratios"] = {f"{a} / {b}": round(out[a]["decode_tok_s"] / out[b]["decode_tok_s"], 3)
                     for a, b in pairs if a in out and b in out}
    return out


def main(root: Path, out_dir: Path) -> None:
    A, B, C, D = (root / n for n in "ABCD")
    a1 = offload(A / "offload-layout-q4-a1.json")
    bs = [offload(B / f"offload-layout-q4-b{i}.json") for i in (1, 2)]
    tl = offload(B / "offload-layout-q4-tl.json")
    bf = offload(C / "offload-bf16-bf16.json")
    ds = [offload(D / f"offload-layout-q4-d{i}.json") for i in (1, 2)]
    tld = offload(D / "offload-layout-q4-tl.json")
    tl_steps = {c: timeline_steps(d / "offload-layout-q4-tl.json")[0] for c, d in (("B", B), ("D", D))}
    run = json.loads((C / "run.err").read_text().strip().splitlines()[-1])
    run = run.get("stats", run)
    res = {
        "bench": "bench_cpu_experts_gpu.py (offload_variant in benchmarks/lease/lib.sh): one eval document "
                 "(csv.py.txt), 127 decode tokens, --vram-gb 4, replayed routing, one fresh process per call's row set",
        "date": "2026-12-03", "session": 22, "device": DEVICE, "model": MODEL,
        "what": "--device-fill copy (store/copyfill.py): the copy engines fill the free slots outside the step's "
                "graph (a plan made on the host when the decode starts, reserved slots, cudaMemcpyAsync batches on a "
                "side stream, the step's first kernel entering what landed), against the gather fill (a pick, a copy "
                "kernel on a side stream and an install inside each step's graph: `auto`, the default of sessions "
                "19-21, and a fixed 7). A (9d4e527, default auto): copy in popularity and expert-id order beside the "
                "then default. B (24d0742, default copy): the new default against the old, two processes, and a "
                "timeline of the default. C (24d0742): the CUDA tests with the new default, `tiered run`, bf16. D "
                "(0db08c9): one batch queued before the decode's first step, the rest after its launch; two processes "
                "and a timeline.",
        "commits": {"A": "9d4e527", "B": "24d0742", "C": "24d0742", "D": "0db08c9"},
        "q4": {"A": {**a1, "copy": copy_stats(A / "offload-layout-q4-a1.json")},
               "B1": {**bs[0], "copy": copy_stats(B / "offload-layout-q4-b1.json")},
               "B2": {**bs[1], "copy": copy_stats(B / "offload-layout-q4-b2.json")},
               "B_timeline": {**tl, "copy": copy_stats(B / "offload-layout-q4-tl.json")}},
        "q4_means_B": means(bs, [("default", "lru+fillautoid/device"), ("default/tuned", "lru+fillauto/device"),
                                 ("default/tuned", "lru+fill7/device")]),
        "q4_D": {"D1": ds[0], "D2": ds[1], "D_timeline": tld},
        "q4_means_D": means(ds, [("default", "lru+fillautoid/device")]),
        "timeline_steps": tl_steps,
        # issue 13's offload ratio: the q4 default (D's mean) over bf16's default (C), calls on the same day's box
        "q4_vs_bf16_offload": None,
        "bf16_C": {**bf, "copy": copy_stats(C / "offload-bf16-bf16.json")},
        "cuda_tests_C": summary(C / "cuda-tests.log"),
        "tiered_run_C": {k: run.get(k) for k in ("decode_graphs", "decode_tok_s")} | {
            "fill_copy": (run.get("device_step") or {}).get("fill_copy")},
        "reproduce": "bash benchmarks/lease/s22_call{A,B,C,D}.sh (carry .carry/shared), TIERED_COMMIT=<commit>; then "
                     "this script over the unpacked calls",
    }
    q4, b16 = res["q4_means_D"]["default"]["decode_tok_s"], bf["runs"]["default"]["decode_tok_s"]
    res["q4_vs_bf16_offload"] = round(q4 / b16, 3)
    out = out_dir / "offload-fill-copy-2026-12-03-h200-s22.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
