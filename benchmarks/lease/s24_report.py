"""Session 24: assemble benchmarks/results/quant-libraries-2026-12-03-h200-s24.json (issue 13's kept libraries,
measured for the first time, and quant_matmul's dense tiles) from the files the lease calls brought back, unpacked
under one folder per call (A-D: benchmarks/lease/s24_call*.sh). Every figure is read from those files.

    python3 benchmarks/lease/s24_report.py /tmp/s24 benchmarks/results
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

LIBS = ("torch ", "gemlite", "torchao")


def decode_rows(p: Path) -> dict:
    """Per dense matrix at one decode row: our q4 GEMV (TUNED, then qlinear), each library, cuBLAS bf16 (us)."""
    out: dict = {}
    for r in json.loads(p.read_text())["rows"]:
        if r["section"] != "dense":
            continue
        row = out.setdefault(r["gemv"], {})
        v = r["variant"]
        key = ("bf16 cuBLAS" if r["fmt"] == "bf16" else "ours (TUNED)" if v.startswith("default")
               else "ours (qlinear)" if v.startswith("qlinear") else v)
        row[key] = round(r["us"], 2) if "us" in r else {"error": r["error"]}
    for row in out.values():
        ours = min(v for k, v in row.items() if k.startswith("ours") and isinstance(v, float))
        libs = {k: v for k, v in row.items() if k.startswith(LIBS) and isinstance(v, float)}
        if libs:
            best = min(libs, key=libs.get)
            row["best_library"] = best
            row["ours_vs_best_library"] = round(libs[best] / ours, 3)  # > 1: ours is faster
    return out


def prefill_rows(p: Path) -> dict:
    """Per (matrix, rows): every variant's us, and the fastest quant_matmul tile of a sweep if there was one."""
    out: dict = {}
    for r in json.loads(p.read_text())["rows"]:
        if r["section"] != "prefill" or r.get("config", "").count("x") != 1:
            continue
        row = out.setdefault(f"{r['shape']}/T{r['T']}", {})
        row[f"{r['fmt']} {r['variant']}"] = round(r["us"], 2) if "us" in r else {"error": r["error"]}
    for row in out.values():
        tiles = {k: v for k, v in row.items() if k.startswith("q4 quant_matmul m") and isinstance(v, float)}
        if tiles:
            best = min(tiles, key=tiles.get)
            row["best_tile"], row["default_vs_best_tile"] = best, round(tiles[best] / row["q4 quant_matmul"], 3)
        libs = {k: v for k, v in row.items() if k.startswith(("q4 torch", "q4 gemlite")) and isinstance(v, float)}
        if libs and isinstance(row.get("q4 quant_matmul"), float):
            best = min(libs, key=libs.get)
            row["best_library"], row["default_vs_best_library"] = best, round(libs[best] / row["q4 quant_matmul"], 3)
    return out


def meta(p: Path) -> dict:
    d = json.loads(p.read_text())
    return {k: d.get(k) for k in ("commit", "date", "device", "torch", "triton")}


def main(root: Path, out_dir: Path) -> None:
    A, B, C, D = (root / n for n in "ABCD")
    res = {
        "bench": "quant_libraries", "date": "2026-12-03", "device": "NVIDIA H200 (one, lent)",
        "setup": "10.6B shape's dense matrices (lm_head 151936 x 2048, qkv 5120 x 2048, o_proj 2048 x 4096), q4 "
                 "(group 64, bf16 scale and minimum), decode at one row over 8 copies (lm_head 1), prefill at 16-2048 "
                 "rows; the libraries on our q4 parts (tinygemm: zero = min + 8 scale; GemLite: zero = -min / scale, "
                 "both rounded to bf16), torchao on the bf16 weights (its own rounding); each checked before timing",
        "calls": {"A": {**meta(A / "quant_kernels.json"), "script": "benchmarks/lease/s24_callA.sh"},
                  "B": {**meta(B / "quant_kernels.json"), "script": "benchmarks/lease/s24_callB.sh"}},
        "decode_A": decode_rows(A / "quant_kernels.json"),
        "decode_B": decode_rows(B / "quant_kernels.json"),
        "prefill_dense_B": prefill_rows(B / "quant_prefill.json"),
        "prefill_experts_gemlite_A": [
            {k: r.get(k) for k in ("T", "variant", "config", "us", "vs_bf16")}
            for r in json.loads((A / "quant_prefill.json").read_text())["rows"] if r["fmt"] == "q4"],
    }
    if (C / "quant_prefill.json").exists():
        res["calls"]["C"] = {**meta(C / "quant_prefill.json"), "script": "benchmarks/lease/s24_callC.sh"}
        res["prefill_dense_C"] = prefill_rows(C / "quant_prefill.json")
    if (D / "quant_prefill.json").exists():
        res["calls"]["D"] = {**meta(D / "quant_prefill.json"), "script": "benchmarks/lease/s24_callD.sh"}
        res["prefill_dense_D"] = prefill_rows(D / "quant_prefill.json")
        res["dense_copy_tiles_D"] = {
            f"{r['shape']}/{r['variant']}": {"us": round(r["us"], 2), "gbps": round(r["gbps"], 1)}
            for r in json.loads((D / "quant_prefill.json").read_text())["rows"]
            if r["variant"].startswith("dense copy") and "us" in r}
    runs = {}
    for f in sorted(D.glob("tiered-q4-*.json")) if D.exists() else ():  # one per process (tag after the dash)
        r = json.loads(f.read_text())["modes"]["vram"]
        runs[f.stem.removeprefix("tiered-q4-")] = {
            "prefill512_tok_s_warm": r["prefill_warm"]["prefill_tok_s"],
            "prefill512_tok_s_first": r["prefill_first"]["prefill_tok_s"],
            "prefill512_tok_s_warm_runs": [w["prefill_tok_s"] for w in r["prefill_warm"]["runs"]]
            if "runs" in r["prefill_warm"] and isinstance(r["prefill_warm"]["runs"][0], dict) else None,
            "ttft_s_warm": r["prefill_warm"]["ttft_s"], "decode_tok_s": r["decode_long"]["decode_tok_s"]}
    if runs:
        res["model_q4q4_vram_D"] = {
            "setup": "bench_peers --phase tiered --variant q4 --tiered-only vram: the 10.6B-shape 8-layer random "
                     "Qwen3-MoE, --experts q4 --dense q4, prefill of a 512-token prompt (median of warm repeats) and "
                     "decode (256 tokens), one fresh process each; TIERED_DEQUANT_ROWS: dflt = 2048 (the fused GEMM "
                     "at 512 rows), dq256 = the dense copy at 512 rows, never = 0",
            "runs": runs}
    out = out_dir / "quant-libraries-2026-12-03-h200-s24.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
