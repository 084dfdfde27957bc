"""Session 34's results JSON from calls A-E (s34_call*.sh): the dense copy of a quantized matrix rewritten on the
weight tile (quant_dequant), qlinear's new threshold for it, quant_matmul's swap 5, the grouped kernels' 32-output
tiles (a negative result), repack on the GPU end to end, and what the copy changed in whole prompts.

    python3 benchmarks/lease/s34_report.py /tmp/s34 benchmarks/results

SRC holds the calls unpacked: A/ (s34_callA.tgz) ... F/. The benchmarks' own commit fields name the box's stale copy of
the repository (18b771f): the commits that ran are written here.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
COMMITS = {"A": "01571d5", "B": "0b1843d", "C": "e41a865", "D": "4499394 (code of 6b40210)", "E": "69fbcca",
           "F": "7467dc4"}


def rows(p: Path) -> list:
    return json.loads(p.read_text())["rows"]


def dense(p: Path) -> dict:
    """us by matrix / T: bf16 cuBLAS, qlinear (the model's path), quant_matmul's pick, the copy + cuBLAS, every tile
    and copy block timed, and the tiles that failed to compile."""
    out: dict = {}
    for r in rows(p):
        o = out.setdefault(f"{r['shape']}/T{r['T']}", {})
        key = f"{r['fmt']} {r['variant']}"
        if "us" in r:
            o[key] = round(r["us"], 1)
        else:
            o.setdefault("failed", []).append(f"{key}: {r.get('error', '')[:60]}")
    return out


def grouped(p: Path) -> dict:
    """The grouped expert kernels: the pick and the 32-output tiles, us a layer."""
    out: dict = {}
    for r in rows(p):
        if r["variant"] != "triton grouped" or "us" not in r:
            continue
        if r["config"].startswith("auto") or " n32 " in r["config"]:
            out.setdefault(f"{r['shape']}/T{r['T']}/{r['fmt']}", {})[r["config"]] = round(r["us"], 1)
    return out


def tests(p: Path) -> str:
    return " ".join(line.strip() for line in p.read_text().splitlines() if re.search(r"passed|failed", line))[-160:]


def peers(p: Path) -> dict:
    v = json.loads(p.read_text())["modes"]["vram"]
    return {"decode_tok_s_32": round(v["decode_short"]["decode_tok_s"], 1),
            "decode_tok_s_256": round(v["decode_long"]["decode_tok_s"], 1),
            "prefill512_tok_s_warm": round(v["prefill_warm"]["prefill_tok_s"], 1)}


def gptoss(p: Path, layout: str) -> dict:
    k = json.loads(p.read_text())["layouts"][layout]["kernels"]
    return {str(x["tokens"]): {"graphs_tok_s": round(x["prefill_tok_s"], 1), "runs": [round(r, 1) for r in x["runs"]],
                               "eager_tok_s": round(x["eager_tok_s"], 1)} for x in k["long_prefills"]}


S = src
q4 = peers(S / "D/tiered-q4-final.json")
bf = peers(S / "D/tiered-bf16-final.json")
c_new, c_old = peers(S / "C/tiered-q4-rows257.json"), peers(S / "C/tiered-q4-rows2048.json")
batch = {tag: {b: round(r["tok_s"], 1) for b, r in json.loads((S / f"D/batch-q4-{tag}.json").read_text())["vram"]
               ["own"].items()} for tag in ("rows128", "rows257")}
gpt = {f"{ex} {rows_}": gptoss(S / f"E/gptoss-{ex}-{rows_}.json", ex)
       for ex in ("mxfp4+q8", "q4+q4") for rows_ in ("default", "2048")}
repack = json.loads((S / "A/repack.json").read_text())
out = {
    "bench": "dense-copy (session 34)",
    "date": "2026-12-04",
    "device": "NVIDIA H200 (one GPU of the lent box), torch 2.11, Triton 3.6",
    "commits": COMMITS,
    "models": "10.6B shape: the 8-layer random Qwen3-MoE of the kernel issue (dense matrices qkv 5120 x 2048, o_proj 2048"
              " x 4096, lm_head 151936 x 2048); gpt-oss: the gpt-oss-20b widths cut to 4 layers, random weights",
    "cuda_tests": {c: tests(S / f"{c}/cuda-tests.log") for c in ("A", "B", "C", "D")},
    "dense_copy_call_C": {
        "what": "qlinear's paths at 128-1,024 rows, us (CUDA graphs): 'dequant kernel + cuBLAS' is the dense copy "
                "(quant_dequant, the weight-tile kernel of e41a865) then cuBLAS; 'quant_matmul' the fused GEMM's "
                "pick; 'qlinear (model)' the path the model takes at that commit (the copy from 257 rows); 'dense "
                "copy bnN bkK wW' the copy alone under each block (T 128 only)",
        "us": dense(S / "C/quant_prefill.json")},
    "dense_tiles_call_B": {
        "what": "quant_matmul's interleaved tiles (swap 4, and swap 5 new: the weight tile the MMA's first operand) "
                "at 300-2,047 rows, against the pick and the old copy kernel ('dequant kernel + cuBLAS'), us",
        "us": dense(S / "B/quant_prefill.json")},
    "grouped_n32_call_A": {
        "what": "the grouped expert kernels' 32-output tiles (half the registers of the pick's 64 outputs, offline) "
                "against the pick, us a layer: 0.45-0.70 of the pick's speed, not kept",
        "us": grouped(S / "A/many.json")},
    "whole_repack_q4q4_on_cuda_s": round(repack["whole_repack_cuda_s"], 1),
    "whole_repack_note": "the 8-layer 10.6B checkpoint to --experts q4 --dense q4, quantized on the GPU, with the one "
                         "pass over dense matrices of 9fcabc3 (call A; session 33: 17.3 s before it)",
    "vram_10_6b_call_D": {"q4+q4": q4, "bf16": bf,
                          "q4_vs_bf16_decode": round(q4["decode_tok_s_32"] / bf["decode_tok_s_32"], 3),
                          "q4_vs_bf16_prefill512": round(q4["prefill512_tok_s_warm"] / bf["prefill512_tok_s_warm"], 3)},
    "prefill512_10_6b_call_C": {"copy from 257 rows": c_new, "TIERED_DEQUANT_ROWS=2048": c_old,
                                "ratio": round(c_new["prefill512_tok_s_warm"] / c_old["prefill512_tok_s_warm"], 3)},
    "batch_10_6b_call_D": {"what": "bench_batch_gpu.py VRAM graphs, own routing, 64-token prompts, 64 new, tok/s: "
                                   "the copy from 128 rows (default) against TIERED_DEQUANT_ROWS=257",
                           "tok_s": batch},
    "gpt_oss_prompts_call_E": {
        "what": "one prompt from CUDA graphs, median of 3, fresh processes: the default (the copy from 128 / 257 "
                "rows) against TIERED_DEQUANT_ROWS=2048",
        "tok_s": gpt,
        "ratio_512": {ex: round(gpt[f"{ex} default"]["512"]["graphs_tok_s"] / gpt[f"{ex} 2048"]["512"]["graphs_tok_s"],
                                3) for ex in ("mxfp4+q8", "q4+q4")}},
}


def profile(p: Path) -> dict:
    x = json.loads(p.read_text().strip().splitlines()[-1])["lengths"][0]
    return {"warm_tok_s": round(x["prefill_tok_s_warm"], 1), "profiled_wall_ms": round(x["profiled_wall_ms"], 2),
            "kernel_ms": round(x["kernel_ms"], 3), "launches": x["launches"],
            "top_ms": {t["kernel"][:60]: round(t["ms"], 3) for t in x["top"]}}


out["prefill_profile_call_F"] = {
    "what": "tools/profile_prefill.py, one 512-token prompt of the 10.6B shape: the warm rate from graphs (median of "
            "3), then one eager prefill under torch.profiler (wall and the sum of kernel times, 8 layers)",
    "q4+q4": profile(S / "F/profile-layout-q4.log"), "bf16": profile(S / "F/profile-layout.log")}
out["dense_low_rows_call_F"] = {"what": "qlinear's paths at 32-96 rows, us (is 128 rows too high for the copy?)",
                                "us": dense(S / "F/quant_prefill.json")}
(dst / "dense-copy-2026-12-04-h200-s34.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps({k: out[k] for k in ("vram_10_6b_call_D", "prefill512_10_6b_call_C", "batch_10_6b_call_D")}))
print(out["gpt_oss_prompts_call_E"]["ratio_512"], out["cuda_tests"])
