"""Session 29's result file from the unpacked calls (s29_call{A,B,C,D,E}.sh): python3 benchmarks/lease/s29_report.py
/tmp/s29 benchmarks/results -> sampling-2026-12-04-h200-s29.json. Every figure is read from the calls' own logs and
JSON; nothing is typed in."""
import json
import re
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
COMMITS = {"A": "3eb60fd (+ the uncommitted s29_callA.sh)", "B": "734fdc5", "C": "b925114", "D": "498090a",
           "E": "bf8d15a"}
WHAT = {"A": "session 28's sampler (a sort per step, a generator per row): CUDA tests of session 28's changes, batch "
             "greedy and sampled, bf16 B = 8 at the old cut-over",
        "B": "the nucleus kernels, launched after each batch step (eager): batch greedy and sampled, tiered run",
        "C": "the sampler alone (eager kernels against the sort); the CUDA sampling test",
        "D": "sampling inside the graphs (batch steps and the single-sequence step): the sampler alone, batch "
             "greedy and sampled, tiered run greedy / sampled / top-k",
        "E": "the CUDA tests of the in-graph draws (call D's failure was the test's: rows sharing a page)"}


def batch(call, tag):
    f = src / call / f"batch-{tag}.json"
    if not f.exists():
        return None
    d = json.loads(f.read_text())
    out = {}
    for path, runs in [("graphs", d["vram"]["own"])] + [(p, v["own"]) for p, v in (d.get("vram_paths") or {}).items()]:
        out[path] = {B: {"tok_s": r["tok_s"], "step_ms_median": r["step_s_median"] * 1e3,
                         "temperature": r.get("temperature"), "top_p": r.get("top_p")} for B, r in runs.items()}
    return out


def run(call, tag):
    f = src / call / f"run-{tag}.err"
    if not f.exists():
        return None
    try:
        d = json.loads(f.read_text().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return {k: d.get(k) for k in ("decode_tok_s", "tokens_generated", "step_ahead", "capture_in_call_s")}


def tests(call):
    f = src / call / "cuda-tests.log"
    if not f.exists():
        return None
    t = f.read_text()
    m = re.findall(r"(\d+ (?:passed|failed)[^\n]*)", t)
    return {"summary": m[-1] if m else None, "failed": re.findall(r"FAILED (\S+)", t)}


res = {"bench": "sampling", "date": "2026-12-04", "session": 29, "device": "NVIDIA H200 (one per call; the device "
       "tool released the box between calls, so each call ran on a fresh box)",
       "model": "qwen3-10b-8l (the 8-layer 10.6B shape, random weights), q4+q4 and bf16 layouts in VRAM; own routing, "
                "64-token prompts, 64 new tokens (batch); `tiered run` 256 new tokens from 'def fibonacci(n):'",
       "calls": {c: {"commit": COMMITS[c], "what": WHAT[c], "cuda_tests": tests(c)} for c in COMMITS}}
for c in "ABD":
    res["calls"][c]["batch"] = {t: batch(c, t) for t in ("q4", "q4-sampled", "bf16", "bf16-sampled", "bf16-t8")
                                if batch(c, t) is not None}
for c, tags in (("B", ("q4-greedy", "q4-sampled", "q4-topk", "bf16-greedy", "bf16-sampled")),
                ("D", ("q4-greedy", "q4-sampled", "q4-sampled2", "q4-topk"))):
    res["calls"][c]["tiered_run"] = {t: run(c, t) for t in tags}
for c in "CD":
    res["calls"][c]["sampler"] = json.loads((src / c / "sampling.json").read_text())
A, D = res["calls"]["A"]["batch"], res["calls"]["D"]["batch"]
res["ratios"] = {
    "D_sampled_vs_greedy_ahead": {B: D["q4-sampled"]["graphs"][B]["tok_s"] / D["q4"]["graphs"][B]["tok_s"]
                                  for B in D["q4"]["graphs"]},
    "A_sampled_vs_greedy_ahead_old": {B: A["q4-sampled"]["graphs"][B]["tok_s"] / A["q4"]["graphs"][B]["tok_s"]
                                      for B in A["q4-sampled"]["graphs"]},
    "D_sampled_vs_A_sampled_ahead": {B: D["q4-sampled"]["graphs"][B]["tok_s"] / A["q4-sampled"]["graphs"][B]["tok_s"]
                                     for B in A["q4-sampled"]["graphs"]},
    "A_bf16_B8_cutover4_vs_8": A["bf16"]["graphs"]["8"]["tok_s"] / A["bf16-t8"]["graphs"]["8"]["tok_s"],
    "D_run_sampled_vs_greedy": res["calls"]["D"]["tiered_run"]["q4-sampled"]["decode_tok_s"]
    / res["calls"]["D"]["tiered_run"]["q4-greedy"]["decode_tok_s"],
    "B_run_sampled_vs_greedy_eager_kernels": res["calls"]["B"]["tiered_run"]["q4-sampled"]["decode_tok_s"]
    / res["calls"]["B"]["tiered_run"]["q4-greedy"]["decode_tok_s"],
}
out = dst / "sampling-2026-12-04-h200-s29.json"
out.write_text(json.dumps(res, indent=1) + "\n")
print(out)
print(json.dumps(res["ratios"], indent=1))
