"""Session 35's results JSON from calls A-D (s35_call*.sh): the quantized grouped kernels under the reference
model's routing, and their scales and minimums loaded a step ahead (GroupedConfig.ps), kernel by kernel and in whole
prompts of the 10.6B shape.

    python3 benchmarks/lease/s35_report.py /tmp/s35 benchmarks/results

SRC holds the calls unpacked: A/ (s35_callA.tgz) ... D/ (when it ran). The benchmarks' own commit fields name the
box's stale copy of the repository (6bce672): the commits that ran are written here.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
COMMITS = {"A": "fe44ca9", "B": "24ef91d", "C": "736f6f1",
           "D": "0fe3994 (code of 14b478f); D2 (the quant_matmul CUDA tests) on the same box"}


def rows(p: Path) -> list:
    return json.loads(p.read_text())["rows"]


def grouped(p: Path) -> dict:
    """us a layer by shape / T / format: every grouped tile timed (the pick named 'auto ...')."""
    out: dict = {}
    for r in rows(p):
        if r.get("variant") != "triton grouped" or "us" not in r:
            continue
        out.setdefault(f"{r['shape']}/T{r['T']}/{r['fmt']}", {})[r["config"]] = round(r["us"], 1)
    return out


def picks(p: Path) -> dict:
    """The picks alone: us a layer and the bf16 pick's time over it (vs_bf16)."""
    out: dict = {}
    for r in rows(p):
        if r.get("variant") == "triton grouped" and "us" in r and r["config"].startswith("auto"):
            out[f"{r['shape']}/T{r['T']}/{r['fmt']}"] = {"us": round(r["us"], 1),
                                                        "vs_bf16": round(r.get("vs_bf16", 1.0), 3),
                                                        "config": r["config"]}
    return out


def tests(p: Path) -> str:
    return " ".join(line.strip() for line in p.read_text().splitlines() if re.search(r"passed|failed", line))[-160:]


def prompts(p: Path) -> dict:
    """tools/profile_prefill.py --no-profile: tokens -> warm tok/s (median of 5 after a first run) and the runs."""
    out = {}
    for m in re.finditer(r"== (\d+) tokens, chunk \d+, graphs: warm ([\d,]+) tok/s \[([\d, ]+)\]", p.read_text()):
        out[m.group(1)] = {"warm_tok_s": int(m.group(2).replace(",", "")),
                           "runs": [int(x) for x in m.group(3).split(", ")]}
    return out


def ncu(p: Path) -> dict:
    """Per profiled kernel launch: duration, DRAM TB/s, registers, achieved occupancy, the busiest pipeline."""
    out: dict = {}
    for block in re.split(r"\n  (?=_)", p.read_text())[1:]:
        name = block.split(" ", 1)[0]

        def get(label: str) -> str | None:
            m = re.search(rf"{label}\s+\S+\s+([\d.,]+)", block)
            return m.group(1) if m else None
        pipe = re.search(r"INF\s+(\w+) is the highest-utilized pipeline \(([\d.]+)%\)", block)
        out.setdefault(name, []).append({"us": get("Duration"), "dram_tb_s": get("Memory Throughput(?= +Tbyte)"),
                                         "registers": get("Registers Per Thread"),
                                         "achieved_occupancy_pct": get("Achieved Occupancy"),
                                         "no_eligible_pct": get("No Eligible"),
                                         "top_pipe": f"{pipe.group(1)} {pipe.group(2)}%" if pipe else None})
    return out


S = src
out = {
    "bench": "prefill-scales (session 35)",
    "date": "2026-12-04",
    "device": "NVIDIA H200 (one GPU of the lent box), torch 2.11, Triton 3.6",
    "commits": COMMITS,
    "shapes": "one layer's experts, slot = expert: 10.6B D 2048 F 768 E 128 K 8; 397B D 4096 F 1024 E 512 K 10; "
              "gpt-oss D = F = 2880 E 32 K 4. Whole prompts: the 8-layer random 10.6B Qwen3-MoE in VRAM, q4+q4 "
              "(--experts q4 --dense q4) and bf16, CUDA graphs",
    "routing": "replay: the reference model's (olmoe-code-17m) routing over ../shared/text/fit, layer 0, mapped onto "
               "the shape by tiered.predict.replay.map_routing (bench_quant_kernels --routing replay); uniform: "
               "distinct top-K drawn uniformly (gpt-oss's 32 experts are not a multiple of the reference's 64)",
    "cuda_tests": {c: tests(S / f"{c}/cuda-tests.log") for c in "ABC"} | {
        "D": "32 passed, none failed, when the call's 90 s limit stopped the run (rc 124): the 24 of the 10.6B shape "
             "with swap 0 / 1 and ps 1 and 8 of test_cuda_quant_matmul_interleaved",
        "D2": "test_cuda_quant_matmul_interleaved alone, on the same warm box: 12 passed in 30.36s"},
    "routing_call_A": {
        "what": "the picks before this session's change, us a layer, replayed against uniform routing",
        "replay": picks(S / "A/replay.json"), "uniform": picks(S / "A/uniform.json"),
        "replay_many_sweep": grouped(S / "A/replay.json")},
    "ncu_bf16_call_A": {
        "what": "Nsight Compute of bf16's grouped kernels at the 10.6B shape, T 2048, uniform (PDL off, eager). The "
                "q4 launches of the same run were not profiled (--launch-skip 4 --launch-count 4 covered bf16's "
                "eight launches only)",
        "kernels": ncu(S / "A/ncu.txt")},
    "scales_ahead_call_B": {
        "what": "each interleaved tile with its scales loaded a step ahead (ps1) and in the step (ps0), us a layer; "
                "the pick ('auto') had ps 1 in every interleaved tile in this call",
        "replay_10_6B_397B": grouped(S / "B/ps-replay.json"), "uniform_gpt_oss": grouped(S / "B/ps-gptoss.json")},
    "prompts_10_6B_call_B": {"q4+q4 ps1": prompts(S / "B/prompt-layout-q4-ps1.log"),
                             "q4+q4 ps0": prompts(S / "B/prompt-layout-q4-ps0.log"),
                             "bf16": prompts(S / "B/prompt-layout-ps1.log")},
    "rule_call_C": {
        "what": "the final rule (swap 5 with ps 1, q4's many-rows tile from 64 rows an expert, swap 4 ps 0): T 1024 "
                "(64 rows an expert, replay) every tile both ways; the picks at T 512 / 2048 (replay) and gpt-oss",
        "replay_T1024": grouped(S / "C/rule-1024.json"), "replay_picks": picks(S / "C/rule-replay.json"),
        "uniform_gpt_oss_picks": picks(S / "C/rule-gptoss.json")},
    "prompts_10_6B_call_C": {"q4+q4 rule": prompts(S / "C/prompt-layout-q4-psrule.log"),
                             "q4+q4 TIERED_QGROUPED_PS=0": prompts(S / "C/prompt-layout-q4-ps0.log"),
                             "bf16": prompts(S / "C/prompt-layout-psrule.log")},
}
pc = out["prompts_10_6B_call_C"]
out["prompts_10_6B_call_C"]["ratios"] = {
    t: {"rule_vs_ps0": round(pc["q4+q4 rule"][t]["warm_tok_s"] / pc["q4+q4 TIERED_QGROUPED_PS=0"][t]["warm_tok_s"], 3),
        "q4_vs_bf16": round(pc["q4+q4 rule"][t]["warm_tok_s"] / pc["bf16"][t]["warm_tok_s"], 3)}
    for t in pc["bf16"]}
if (S / "D").is_dir():
    batch = {}
    for tag in ("ps0", "ps1"):
        f = S / f"D/batch-q4-{tag}.json"
        if f.exists():
            batch[tag] = {b: round(r["tok_s"], 1) for b, r in json.loads(f.read_text())["vram"]["own"].items()}
    out["split_tiles_call_D"] = {
        "what": "the split tiles (swap 0) and quant_matmul with ps flipped (--ps-sweep: each pick against itself with "
                "ps 1 - ps), replay, us a layer; batches of 32 / 128 rows (q4+q4, bench_batch_gpu VRAM graphs, own "
                "routing, tok/s) at the default against TIERED_QGROUPED_PS=1",
        "grouped": grouped(S / "D/ps0.json") if (S / "D/ps0.json").exists() else None, "batch_tok_s": batch}
(dst / "prefill-scales-2026-12-04-h200-s35.json").write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out["prompts_10_6B_call_C"]["ratios"]), json.dumps(out["cuda_tests"]))
