"""Session 25: assemble benchmarks/results/prefill-chunk-2026-12-03-h200-s25.json (split-K for the dense q4 GEMM,
qlinear's GEMV rows, where a prefill's time goes, and the prefill chunk) from the files the lease calls brought
back, unpacked under one folder per call (A-F: benchmarks/lease/s25_call*.sh). Every figure is read from those
files; the compute bound is derived from the model's shape and call A's fastest cuBLAS rate.

    python3 benchmarks/lease/s25_report.py /tmp/s25 benchmarks/results
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

COMMITS = {"A": "2893bb0", "B": "4f2bc41", "C": "074f1cf", "D": "71091b1", "E": "364dee2", "F": "6abbe1e"}
LIBS = {"gemlite A16W4": "gemlite", "torch tinygemm": "tinygemm", "cuBLAS F.linear": "cublas_bf16"}
# the 8-layer 10.6B shape (tools/make_random_checkpoint.py qwen3-10b-8l): D 2048, 32 heads of 128, 4 KV heads,
# 128 experts top-8 of F 768
SHAPE = dict(layers=8, hidden=2048, heads=32, kv_heads=4, head_dim=128, experts=128, top_k=8, moe_ffn=768)


def split_sweep(p: Path) -> dict:
    """Call A: per (matrix, rows) the model's qlinear, the unsplit quant_matmul, the fastest split-K tile, the
    libraries and cuBLAS bf16 (us)."""
    out: dict = {}
    rows = [r for r in json.loads(p.read_text())["rows"] if "us" in r and r["fmt"] in ("q4", "bf16")]
    for r in rows:
        e = out.setdefault(r["shape"], {}).setdefault(str(r["T"]), {})
        v = r["variant"]
        if v == "qlinear (model)":
            e["qlinear_us"] = round(r["us"], 1)
        elif v == "quant_matmul":
            e["quant_matmul_unsplit_rule_us"] = round(r["us"], 1)
        elif v in LIBS:
            e[f"{LIBS[v]}_us"] = round(r["us"], 1)
        elif "split" in v and ("best_split_us" not in e or r["us"] < e["best_split_us"]):
            e["best_split_us"], e["best_split_tile"] = round(r["us"], 1), v.replace("quant_matmul ", "")
    return out


LINE = re.compile(r"^(qkv|o_proj|lm_head)\s+(\d+)\s+(q4|bf16)\s+(.+?)\s{2,}([\d.]+)\s")


def rows_sweep(p: Path) -> dict:
    """Call B (its JSON was not written: the bench hit its time limit at lm_head 8 rows): the printed rows, us."""
    out: dict = {}
    names = {"qlinear (model)": "qlinear_us", "quant_matmul": "quant_matmul_us", **{k: f"{v}_us" for k, v in
                                                                                     LIBS.items()}}
    for line in p.read_text().splitlines():
        m = LINE.match(line)
        if m and m.group(4).strip() in names:
            out.setdefault(m.group(1), {}).setdefault(m.group(2), {})[names[m.group(4).strip()]] = float(m.group(5))
    return out


def profiles(d: Path) -> dict:
    """Call C: per layout and length the warm rate and the profiled run's kernel share."""
    out: dict = {}
    for v in ("q4", "bf16"):
        res = json.loads((d / f"profile-prefill-{v}.json").read_text())
        out[v] = {str(r["tokens"]): {"prefill_tok_s_warm_generate": round(r["prefill_tok_s_warm"]),
                                     "profiled_wall_ms": round(r["profiled_wall_ms"], 2),
                                     "kernel_ms": round(r["kernel_ms"], 2), "kernel_share": round(r["kernel_share"], 3),
                                     "launches": r["launches"],
                                     "top": [{"kernel": k["kernel"][:60], "ms": round(k["ms"], 3)}
                                             for k in r["top"][:6]]}
                  for r in res["lengths"]}
    return out


def host(d: Path) -> dict:
    """Call D: the mini model's 512-token prefill, host-only against synchronised ms (three runs)."""
    out: dict = {}
    for v in ("q4", "bf16"):
        runs = re.findall(r"host ([\d.]+) ms, synchronised ([\d.]+) ms", (d / f"host-{v}.log").read_text())
        out[v] = [{"host_ms": float(a), "synchronised_ms": float(b)} for a, b in runs]
    return out


def chunks(d: Path) -> dict:
    """Call E: warm synchronised prefill tok/s per layout, length and chunk."""
    out: dict = {}
    for v in ("q4", "bf16"):
        res = json.loads((d / f"chunks-{v}.json").read_text())
        for r in res["lengths"]:
            out.setdefault(v, {}).setdefault(str(r["tokens"]), {})[str(r["chunk"])] = {
                "tok_s": round(r["prefill_tok_s_warm"]), "runs": [round(x) for x in r["runs"]]}
    m = re.search(r"profiled run ([\d.]+) ms wall, ([\d.]+) ms of kernels \((\d+)%\)",
                  (d / "profile-q4-4096.log").read_text())
    out["q4_4000_at_4096_profiled"] = {"wall_ms": float(m.group(1)), "kernel_ms": float(m.group(2)),
                                       "kernel_share": int(m.group(3)) / 100}
    return out


def flop_bound(tokens: int, tflops: float) -> dict:
    """Matmul FLOPs of a prefill of `tokens` (projections, router, top-k experts; causal attention scores and
    values) at the given rate: a compute bound, which cuBLAS's own rate makes optimistic for small GEMMs."""
    s = SHAPE
    d, hd, h, kv = s["hidden"], s["head_dim"], s["heads"], s["kv_heads"]
    per_token = 2 * ((h + 2 * kv) * hd * d + d * h * hd + s["experts"] * d + s["top_k"] * 3 * s["moe_ffn"] * d)
    attn = 2 * 2 * h * hd * tokens * (tokens + 1) / 2  # q.k and p.v over the causal pairs
    flops = s["layers"] * (per_token * tokens + attn)
    t = flops / (tflops * 1e12)
    return {"tokens": tokens, "tflop": round(flops / 1e12, 3), "at_tflops": tflops, "ms": round(t * 1e3, 2),
            "tok_s": round(tokens / t)}


def logs(root: Path, calls: str) -> dict:
    out = {}
    for c in calls:
        p = root / c / "cuda-tests.log"
        if p.exists():
            out[c] = [ln for ln in p.read_text().splitlines() if re.search(r"passed|failed", ln)][-1:]
    return out


def main() -> None:
    root, dst = Path(sys.argv[1]), Path(sys.argv[2])
    A = json.loads((root / "A" / "quant_prefill.json").read_text())
    best_cublas = max(r.get("tflops", 0) for r in A["rows"] if r.get("fmt") == "bf16" and "us" in r)
    ch = chunks(root / "E")
    res = {
        "date": "2026-12-03", "session": 25, "device": "NVIDIA H200 (one GPU, lent box)", "commits": COMMITS,
        "torch": A.get("torch"), "triton": A.get("triton"),
        "model": "qwen3-10b-8l random weights (tools/make_random_checkpoint.py, seed 0), in VRAM",
        "split_k_A": split_sweep(root / "A" / "quant_prefill.json"),
        "gemv_rows_B": rows_sweep(root / "B" / "rows.log"),
        "prefill_profile_C": profiles(root / "C"),
        "prefill_host_mini_D": host(root / "D"),
        "prefill_chunks_E": ch,
        "prefill_4000_q4_vs_chunk512": round(ch["q4"]["4000"]["4096"]["tok_s"] / ch["q4"]["4000"]["512"]["tok_s"], 3),
        "prefill_4000_bf16_vs_chunk512": round(ch["bf16"]["4000"]["4096"]["tok_s"] / ch["bf16"]["4000"]["512"]["tok_s"],
                                               3),
        "compute_bound_4000": flop_bound(4000, round(best_cublas, 1)),
        "cuda_tests": logs(root, "ABDF"),
        "notes": {
            "A": "split sweep: 7 tiles x splits 1-8 at 8-256 rows, qkv and o_proj; the rule in quant_grouped."
                 "pick_matmul_config was read from it (in-sample)",
            "B": "qlinear at 1-16 rows: the multi-row GEMV (the model's path up to MAX_ROWS, 16 then) against "
                 "quant_matmul under the new rule; MAX_ROWS is 2 from it. The bench hit its 170 s limit at lm_head "
                 "8 rows: no JSON, rows parsed from the log",
            "C": "the prefill through generate (its prefill_tok_s stops the clock without a sync) and one profiled "
                 "run per length: kernel time against wall",
            "D": "qwen3-mini (16 layers, 128 experts top-8, tiny widths): the host's work per layer without the "
                 "10.6B kernels; the host-only time equals the synchronised time",
            "E": "Engine.prefill_chunk set per run in one process; synchronised warm rates; the llama.cpp baseline "
                 "was not run this session (no device time left)",
            "F": "CUDA tests at 6abbe1e; the default-chunk rows and bench_peers did not run (device time spent)",
        },
        "baseline_note": "llama.cpp was not run in this session. Earlier same-box figures, not same-run: llama-bench "
                         "pp512 bf16 20,617 and Q4_0 52,597 tok/s (session 5, peers-2026-12-01-h200-s5.json)",
    }
    out = dst / "prefill-chunk-2026-12-03-h200-s25.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(out)
    for v in ("q4", "bf16"):
        print(v, {L: {c: x["tok_s"] for c, x in r.items()} for L, r in ch[v].items()})
    print(res["compute_bound_4000"])


if __name__ == "__main__":
    main()
