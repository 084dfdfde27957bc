"""Session 32's results JSON from calls A-D (s32_call*.sh; D was run inline on C's warm box):
gpt-oss's prompts on flash attention with sinks (model/sinkflash.py) against the plain path and llama.cpp.

    python3 benchmarks/lease/s32_report.py /tmp/s32 benchmarks/results

SRC holds the calls unpacked: a/ (s32_callA.tgz), b1/ (call B's first run: the CUDA tests), b/ (call B's second
run), c/ (s32_callC.tgz), d/ (call D's bash.tgz). The benchmarks' own commit fields name the box's stale copy of the
repository (6263a8c): the commits that ran are written here.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
L, D, F, E, K, V, H, KV, HD, W = 4, 2880, 2880, 32, 4, 201088, 64, 8, 64, 128
PEAK_BF16 = 989e12  # H200 SXM dense bf16 tensor FLOP/s (NVIDIA's data sheet)
attn = D * H * HD + 2 * D * KV * HD + H * HD * D  # q, k, v, o
flops_tok = 2 * L * (attn + K * 3 * D * F + E * D)  # projections, the K experts, the router


def attn_flops(n: int) -> float:
    """QK and PV of one n-token causal prompt: two full layers (n^2 / 2 pairs), two sliding ones (<= W keys)."""
    full = 2 * 2 * (n * n / 2) * H * HD
    slide = 2 * 2 * sum(min(i + 1, W) for i in range(n)) * H * HD
    return 2 * full + 2 * slide


def jl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip().startswith("{")]


def tests(p: Path) -> dict:
    t = p.read_text()
    return {"summary": re.findall(r"(\d+ (?:passed|failed)[^\n]*)", t)[-1], "failed": re.findall(r"FAILED (\S+)", t)}


def log_prefills(p: Path) -> dict:
    """bench_gpt_oss_gpu.py's per-prompt log lines (call C's bench was cut by its time limit after bf16)."""
    out = {}
    for n, g, e, nv in re.findall(r"prefill of (\d+) tokens: (\d+) tok/s, eager_tok_s (\d+), "
                                  r"eager_naive_sinks_tok_s (\d+)", p.read_text()):
        out[int(n)] = {"prefill_tok_s": float(g), "eager_tok_s": float(e), "eager_naive_sinks_tok_s": float(nv)}
    return out


B = json.loads((src / "b" / "gpt_oss_gpu.json").read_text())
Dq = json.loads((src / "d" / "gpt_oss_gpu.json").read_text())
read = B["hbm_read_gbps"]["read_gbps"] * 1e9
llama = {q: {r["n_prompt"]: r["avg_ts"] for r in json.loads((src / "c" / f"llama-bench-{q}.json").read_text())}
         for q in ("bf16", "Q4_0")}
llama_d = {r["n_prompt"]: r["avg_ts"] for r in json.loads((src / "d" / "llama-bench-Q4_0-D.json").read_text())}
llama_a = {q: {r["n_prompt"]: r["avg_ts"] for r in json.loads((src / "a" / f"llama-bench-{q}.json").read_text())}
           for q in ("bf16", "Q4_0")}
batched = {q: {r["pl"]: r for r in jl(src / "c" / f"llama-batched-{q}.jsonl")} for q in ("bf16", "Q4_0")}
c_bf16 = log_prefills(src / "c" / "gptoss.log")

prompts = {}
for spec, q in (("source", "bf16"), ("q4+q4", "Q4_0")):
    kb = B["layouts"][spec]["kernels"]
    pbytes = kb["bytes_per_step"] + (E - K) * L * kb["block_size"] - V * D * 2  # every weight once but the embedding
    same = {p["tokens"]: p for p in Dq["layouts"]["q4+q4"]["kernels"]["long_prefills"]} if spec == "q4+q4" else c_bf16
    rows = {}
    for p in kb["long_prefills"]:
        n = p["tokens"]
        bound_s = max(pbytes / read, (n * flops_tok + attn_flops(n)) / PEAK_BF16)
        s = same[n]
        lq = llama_d[n] if spec == "q4+q4" else llama[q][n]
        rows[str(n)] = {
            "same_call_as_llamacpp": {"call": "D (C's box)" if spec == "q4+q4" else "C",
                                      "graphs_tok_s": s["prefill_tok_s"], "eager_tok_s": s["eager_tok_s"],
                                      "eager_plain_sinks_tok_s": s["eager_naive_sinks_tok_s"],
                                      "llamacpp_pp_tok_s": lq, "vs_llamacpp": s["prefill_tok_s"] / lq,
                                      "bound_tok_s": n / bound_s, "vs_bound": s["prefill_tok_s"] * bound_s / n},
            "call_B": {"graphs_tok_s": p["prefill_tok_s"], "eager_tok_s": p.get("eager_tok_s"),
                       "eager_plain_sinks_tok_s": p.get("eager_naive_sinks_tok_s"),
                       "eager_flash_vs_plain": p["eager_tok_s"] / p["eager_naive_sinks_tok_s"],
                       "prefill_graphs": p["prefill_graphs"]},
        }
    prompts[spec] = {"llamacpp_gguf": q, "weight_bytes_but_embedding": pbytes, "by_tokens": rows}

batch = {}
for spec, q in (("source", "bf16"), ("q4+q4", "Q4_0")):
    flash = json.loads((src / "b" / f"batch-{spec}-auto.json").read_text())
    r = flash["vram"]["own"]["32"]
    lb = batched[q][32]
    row = {"call_B_flash": {"prompts_tok_s": r["prefill_tok_s"], "decode_tok_s": r["tok_s"], "s_tok_s": r["s_tok_s"],
                            "profile": flash["vram_prompt_profile"]["32"]},
           "llamacpp_s_pp_call_C": lb["speed_pp"], "llamacpp_s_tg_call_C": lb["speed_tg"]}
    if spec == "source":
        plain = json.loads((src / "b" / "batch-source-naive.json").read_text())
        rp = plain["vram"]["own"]["32"]
        row["call_B_plain_sinks"] = {"prompts_tok_s": rp["prefill_tok_s"], "decode_tok_s": rp["tok_s"],
                                     "profile": plain["vram_prompt_profile"]["32"]}
        row["call_B_flash_vs_plain"] = r["prefill_tok_s"] / rp["prefill_tok_s"]
        c = json.loads((src / "c" / "batch-source.json").read_text())["vram"]["own"]["32"]
        row["call_C"] = {"prompts_tok_s": c["prefill_tok_s"], "decode_tok_s": c["tok_s"], "s_tok_s": c["s_tok_s"],
                         "prompts_vs_llamacpp_s_pp": c["prefill_tok_s"] / lb["speed_pp"],
                         "decode_vs_llamacpp_s_tg": c["tok_s"] / lb["speed_tg"]}
        a = json.loads((src / "a" / "batch-source.json").read_text())
        row["call_A_plain_sinks"] = {"prompts_tok_s": a["vram"]["own"]["32"]["prefill_tok_s"],
                                     "profile": a["vram_prompt_profile"]["32"]}
    else:  # call C's q4+q4 layout was not made (its bench ran out of time beside the build): B's figure, C's llama
        row["cross_call_prompts_vs_llamacpp_s_pp"] = r["prefill_tok_s"] / lb["speed_pp"]
    batch[spec] = row

res = {
    "bench": "s32_gpt_oss_prompts_flash_sinks", "date": "2026-12-04", "device": "NVIDIA H200 (one, session 32 leases)",
    "model": "gpt-oss-20b widths cut to 4 layers (tools/make_random_checkpoint.py gpt-oss-20b-4l, seed 0), in VRAM",
    "commits": {"A": "a1eb41f (plain sink path: the profile that found it)",
                "B": "dda7859 (CUDA tests, b1/), ebbdad6 (tests of test_sinkflash.py, benches: b/)",
                "C": "2995040", "D": "2995040 (inline on C's warm box: bench_gpt_oss_gpu.py q4+q4, llama-bench Q4_0)"},
    "cuda_tests": {"B_first": tests(src / "b1" / "cuda-tests.log"), "B_second": tests(src / "b" / "cuda-tests.log")},
    "hbm_read_gbps": B["hbm_read_gbps"]["read_gbps"],
    "bound": "max(every weight but the embedding table once / measured HBM read rate, FLOPs of the projections, the "
             "K experts and causal attention / 989 TFLOP/s)",
    "single_prompt": prompts,
    "batch_32_prompts_of_64": batch,
    "profile_note": "the profiles' kernel_ms (session 32's runs) summed the aten ops' device time beside their "
                    "kernels' (counted twice); top_kernels lists both: read the non-aten entries",
    "llamacpp": {"bench_call_C": llama, "bench_call_D_Q4_0": llama_d, "bench_call_A": llama_a,
                 "batched_call_C": {q: {str(k): v for k, v in b.items()} for q, b in batched.items()},
                 "note": "call A's llama-batched-bench ran B = 32 alone (cold: 10.4k / 21.0k S_PP) and is not used; "
                         "call C's ran B = 1, 8, 32 in one process as session 31's did"},
}
out = dst / "gpt-oss-prompts-flash-2026-12-04-h200-s32.json"
out.write_text(json.dumps(res, indent=1) + "\n")
for spec, p in prompts.items():
    for n, r in p["by_tokens"].items():
        s = r["same_call_as_llamacpp"]
        print(f"{spec} {n}: graphs {s['graphs_tok_s']:.0f} eager {s['eager_tok_s']:.0f} "
              f"plain {s['eager_plain_sinks_tok_s']:.0f} | llama {s['llamacpp_pp_tok_s']:.0f} -> {s['vs_llamacpp']:.2f}x | bound {s['bound_tok_s']:.0f} "
              f"({s['vs_bound']:.3f}) | B: eager flash/plain {r['call_B']['eager_flash_vs_plain']:.2f}x")
for spec, b in batch.items():
    print(spec, {k: (round(v["prompts_tok_s"]) if isinstance(v, dict) and "prompts_tok_s" in v else v)
                 for k, v in b.items() if k != "profile"})
print(out)
