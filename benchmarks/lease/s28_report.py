"""Session 28: assemble benchmarks/results/batch-ahead-2026-12-03-h200-s28.json (the batch decode with steps ahead
against the serial scheduler, llama-batched-bench's baselines, the GEMV/grouped cut-over sweep and the CUDA tests)
from the files the lease calls brought back, unpacked under one folder per call: A, B, C (s28_call*.sh). Every
figure is read from those files; ratios are computed here.

The three calls ran on three boxes (the device tool released the box between calls): A (CUDA tests, llama.cpp),
B (ours, with and without steps ahead, in one process per layout), C (llama.cpp again, the cut-over sweep; its own
batch runs were cut by the call's time limit). So ours against llama.cpp is across boxes; both llama.cpp runs are
given, and the ratios use the lower of the two (the less favourable to us: the higher llama.cpp figure).
The box's copy of the repository reported a stale HEAD (9fe9bfc) in the benchmarks' "commit" fields; the commits
each call ran are COMMITS.

    python3 benchmarks/lease/s28_report.py /tmp/s28 benchmarks/results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s26_report import batch_runs, jsonl, tests  # noqa: E402
from s27_report import sweep  # noqa: E402

COMMITS = {"A": "dbe91d6 (+ the s28 lease scripts, committed in 4664978)", "B": "dbe91d6 (+ the lease scripts)",
           "C": "4664978"}
BATCHES = ("1", "8", "32", "128")


def batched(d: Path) -> dict:
    """llama-batched-bench (64-token prompts, 64 new tokens, all layers on the GPU) on both GGUFs."""
    out: dict = {"model": json.loads((d / "model.json").read_text()).get("q4_0_kept")}
    for q in ("q4_0", "bf16"):
        out[q] = {str(r["pl"]): {"s_tg_tok_s": round(r["speed_tg"], 1), "s_pp_tok_s": round(r["speed_pp"], 1),
                                 "s_tok_s": round(r["speed"], 1)} for r in jsonl(d / f"llama-batched-{q}.jsonl")}
    return out


def main() -> None:
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    la, lc = batched(src / "A"), batched(src / "C")
    out: dict = {"date": "2026-12-03", "session": 28, "device": "NVIDIA H200 (one GPU, 16 cores)", "commits": COMMITS,
                 "boxes": "A, B and C each on another box (see the module docstring)",
                 "model": "qwen3-10b-8l: the 8-layer Qwen3-MoE of the 10.6B shape, random weights (seed 0); layouts "
                 "bf16 (source) and q4 experts + q4 dense; 64-token prompts, 64 new tokens, own routing",
                 "llamacpp_batched_A": la, "llamacpp_batched_C": lc,
                 "cuda_tests_A": tests(src / "A" / "cuda-tests.log")}
    out["batch_B"] = {v: batch_runs(src / "B" / f"batch-{v}.json") for v in ("q4", "bf16")}
    out["cutover_C"] = {"note": "us per layer, one resident layer, uniform top-8 routing, timed in CUDA graphs: "
                        "'gemv' = the one-token kernels over T*K pairs, 'grouped' = rows sorted by expert",
                        "10.6B": sweep(src / "C" / "quant_prefill.json")}
    ratios: dict = {}
    for v, q in (("q4", "q4_0"), ("bf16", "bf16")):
        p = out["batch_B"][v]["paths"]
        r = ratios[v] = {}
        for b in BATCHES:
            ahead, serial = p["graphs"]["own"][b]["tok_s"], p["serial"]["own"][b]["tok_s"]
            ref = max(la[q][b]["s_tg_tok_s"], lc[q][b]["s_tg_tok_s"])
            r[f"B{b}"] = {"ahead_tok_s": round(ahead, 1), "serial_tok_s": round(serial, 1),
                          "ahead_vs_serial": round(ahead / serial, 3), "llama_s_tg_tok_s": ref,
                          "ahead_vs_llama": round(ahead / ref, 3), "serial_vs_llama": round(serial / ref, 3),
                          "step_ms_ahead": round(p["graphs"]["own"][b]["step_s_median"] * 1e3, 3),
                          "step_ms_serial": round(p["serial"]["own"][b]["step_s_median"] * 1e3, 3)}
    out["ratios"] = ratios
    name = dst / "batch-ahead-2026-12-03-h200-s28.json"
    name.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
