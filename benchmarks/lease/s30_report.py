"""Session 30's result file from the unpacked calls (s30_call*.sh): python3 benchmarks/lease/s30_report.py /tmp/s30
benchmarks/results -> l2warm-2026-12-04-h200-s30.json. Every figure is read from the calls' own logs and JSON;
nothing is typed in. /tmp/s30/A and /tmp/s30/B hold calls A's and B's unpacked tgz."""
import json
import re
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
A = src / "A"
B = src / "B"
WARM = {"off": "off", "lines": "TIERED_L2_WARM=lines", "bulk": "TIERED_L2_WARM=bulk",
        "last": "TIERED_L2_WARM=last", "nodown": "TIERED_L2_WARM=lines TIERED_L2_WARM_DOWN=0", "off2": "off (again)",
        "lines2": "TIERED_L2_WARM=lines (again)"}


def vram(variant, tag, call=A):
    f = call / f"tiered-{variant}-{tag}.json"
    if not f.exists():
        return None
    d = json.loads(f.read_text())
    v = d["modes"]["vram"]
    b = d["bytes"]
    step_bytes = b["dense_bytes"] + b["active_expert_bytes"]
    bound = d["read_bw"]["gbps"] * 1e9 / step_bytes
    return {"decode_tok_s_32": v["decode_short"]["decode_tok_s"], "runs_32": v["decode_short"]["runs"],
            "decode_tok_s_256": v["decode_long"]["decode_tok_s"], "bytes_per_token": step_bytes,
            "hbm_read_gbps": d["read_bw"]["gbps"], "hbm_bound_tok_s": bound,
            "vs_hbm_bound": v["decode_short"]["decode_tok_s"] / bound,
            "commit_reported_by_box": d.get("commit")}


t = (A / "cuda-tests.log").read_text()
run = json.loads((A / "run-q4-topk.err").read_text().strip().splitlines()[-1])
res = {"bench": "l2warm", "date": "2026-12-04", "session": 30,
       "device": "NVIDIA H200 (one box; call A only)",
       "model": "qwen3-10b-8l (the 8-layer 10.6B shape, random weights), q4+q4 and bf16 layouts in VRAM, "
                "bench_peers.py --phase tiered --tiered-only vram: 64-token prompt, decode_short 32 new tokens "
                "(median of 3), decode_long 256; one process per row",
       "commit": "4ec4f6a (the warm, TIERED_L2_WARM; reverted after this call because every variant was slower). "
                 "The box's copy reported the previous HEAD, 82ee1bb, in the benchmarks' own commit field",
       "what": "a side-stream kernel, forked after each layer's router inside the decode graph, asks L2 for the "
               "layer's chosen experts' down rows and the next layer's qkv and o_proj (after the last layer, the "
               "lm_head's first 24 MiB), so that those GEMVs would read L2: lines = prefetch.global.L2 per 128-byte "
               "line; last = the same with evict_last; bulk = cp.async.bulk.prefetch.L2 per 64 KiB chunk for the "
               "dense targets (the down rows stay on lines)",
       "q4": {k: vram("q4", k) for k in WARM if vram("q4", k)},
       "bf16": {k: vram("bf16", k) for k in ("off", "lines") if vram("bf16", k)},
       "settings": WARM,
       "cuda_tests": {"summary": re.findall(r"(\d+ passed[^\n]*)", t)[-1], "failed": re.findall(r"FAILED (\S+)", t),
                      "files": "tests/test_l2warm.py tests/test_sampling.py tests/test_scheduler_ahead.py "
                               "tests/test_ahead.py -k 'cuda and (warm or sampl or ahead or draws)'"},
       "run_top_k_40": {k: run.get(k) for k in ("decode_tok_s", "tokens_generated", "step_ahead")},
       "reproduce": "git checkout 4ec4f6a; bash benchmarks/lease/s30_callA.sh (carry .carry and .whl), then "
                    "python3 benchmarks/lease/s30_report.py <unpacked calls> benchmarks/results"}
q, b = res["q4"], res["bf16"]
res["ratios"] = {"q4_warm_lines_vs_off": q["lines"]["decode_tok_s_32"] / q["off"]["decode_tok_s_32"],
                 "q4_warm_lines2_vs_off2": q["lines2"]["decode_tok_s_32"] / q["off2"]["decode_tok_s_32"],
                 "q4_warm_bulk_vs_off": q["bulk"]["decode_tok_s_32"] / q["off"]["decode_tok_s_32"],
                 "q4_warm_last_vs_off": q["last"]["decode_tok_s_32"] / q["off"]["decode_tok_s_32"],
                 "q4_warm_nodown_vs_off": q["nodown"]["decode_tok_s_32"] / q["off"]["decode_tok_s_32"],
                 "bf16_warm_lines_vs_off": b["lines"]["decode_tok_s_32"] / b["off"]["decode_tok_s_32"],
                 "q4_vs_bf16_decode": q["off"]["decode_tok_s_32"] / b["off"]["decode_tok_s_32"]}


def offload(name):
    d = json.loads((B / f"offload-{name}.json").read_text().strip().splitlines()[-1])
    doc = d["docs"][0]
    r = doc["runs"]["default"]
    keep = ("decode_tok_s", "hit_rate", "vs_serial_belady_bound", "vs_pcie_bound", "bytes_h2d_per_token",
            "host_s_per_layer", "h2d_gbps_achieved", "time_per_token_s", "cpu_experts", "device_fill")
    return {"doc": doc["doc"], "expert_slots": doc["expert_slots"], "belady": doc["belady"],
            "tokens_identical": doc["tokens_identical"], "resident": d["resident"], "bandwidth": d["bandwidth"],
            "default": {k: r.get(k) for k in keep},
            "lru_off": {k: doc["runs"]["lru/off"].get(k) for k in ("decode_tok_s", "hit_rate", "vs_serial_belady_bound",
                                                                   "vs_pcie_bound")}}


tb = (B / "cuda-tests.log").read_text()
ob, oq = offload("bf16-bf16"), offload("layout-q4-q4")
vq, vb = vram("q4", "default", B), vram("bf16", "default", B)
res["B"] = {"commit": "4c588ba (the box's copy reported 82ee1bb in the benchmarks' own commit field)",
            "what": "the offload goals at HEAD: --vram-gb 4, replayed routing (csv.py.txt), 127 tokens, defaults, "
                    "fresh processes; the VRAM decode of both layouts in the same call",
            "cuda_tests": {"summary": re.findall(r"(\d+ passed[^\n]*)", tb)[-1],
                           "failed": re.findall(r"FAILED (\S+)", tb), "files": "tests/test_gpt_oss.py -k cuda"},
            "offload_bf16": ob, "offload_q4": oq, "vram_q4": vq, "vram_bf16": vb,
            "ratios": {"issue12_bf16_demand_vs_serial_belady": ob["default"]["vs_serial_belady_bound"],
                       "issue13_q4_offload_vs_pcie_bound": oq["default"]["vs_pcie_bound"],
                       "issue13_q4_vs_bf16_offload": oq["default"]["decode_tok_s"] / ob["default"]["decode_tok_s"],
                       "issue13_q4_vs_bf16_decode": vq["decode_tok_s_32"] / vb["decode_tok_s_32"],
                       "bf16_misses_vs_belady": (1 - ob["default"]["hit_rate"]) / (1 - ob["belady"]["hit_rate"])}}
res["reproduce"] += "; call B: git checkout 4c588ba; bash benchmarks/lease/s30_callB.sh"
out = dst / "l2warm-2026-12-04-h200-s30.json"
out.write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res["ratios"], indent=1))
print(json.dumps(res["B"]["ratios"], indent=1))
