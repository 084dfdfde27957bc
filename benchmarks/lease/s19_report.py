"""Session 19: assemble benchmarks/results/offload-fill-auto-2026-12-02-h200-s19.json (the fill auto against fixed N
and the fill off, q4+q4 and bf16 at --vram-gb 4 with replayed routing) and quant-pairs-attn-2026-12-02-h200-s19.json
(the VRAM decode: the attention split kernel's loads before its PDL wait, the word tile's nibbles in pairs) from the
files the lease calls brought back, unpacked under one folder per call (A-E: benchmarks/lease/s19_call*.sh). Every
figure is read from those files; the HBM bound is bench_peers.hbm_bound of the same run.

    python3 benchmarks/lease/s19_report.py /tmp/s19r benchmarks/results
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from s17_report import decode  # noqa: E402  (a bench_peers JSON's decode figures and its HBM bound)

DEVICE = "NVIDIA H200 (nvidia-h200 lease), Triton 3.6.0, torch 2.11+cu130"
MODEL = ("8-layer Qwen3-MoE of the 10.6B shape (qwen3-10b-8l, random weights, seed 0): q4+q4 (--experts q4 --dense "
         "q4) and bf16 layouts")


def offload(p: Path) -> dict:
    d = json.loads(p.read_text().strip().splitlines()[-1])
    doc = d["docs"][0]
    out = {"commit": d.get("commit"), "doc": doc["doc"], "expert_slots": doc["expert_slots"],
           "belady_hit_rate": doc["belady"]["hit_rate"], "runs": {}}
    for k, r in doc["runs"].items():
        out["runs"][k] = {"decode_tok_s": round(r["decode_tok_s"], 1), "hit_rate": round(r["hit_rate"], 4),
                          "vs_serial_belady_bound": r.get("vs_serial_belady_bound"),
                          "vs_pcie_bound": r.get("vs_pcie_bound"), "device_fill": r.get("device_fill"),
                          "tokens_identical_to_lru_off": doc["tokens_identical"].get(k)}
    return out


def summary(log: Path) -> str:
    """The pytest summary line of a test log."""
    lines = [ln for ln in log.read_text().splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return lines[-1].strip("= ") if lines else "no summary"


def main(root: Path, out_dir: Path) -> None:
    A, B, C, D, E = (root / n for n in "ABCDE")
    fill = {
        "bench": "bench_cpu_experts_gpu.py (offload_variant in benchmarks/lease/lib.sh): one eval document "
                 "(csv.py.txt), 127 decode tokens, --vram-gb 4, replayed routing",
        "date": "2026-12-02", "session": 19, "device": DEVICE, "model": MODEL,
        "what": "--device-fill auto (decode/fillpace.py) against the fill off and fixed N. A and B (add0e8f): the "
                "first rule, whose stall back-off (a window 10% slower than the first) dropped N; D (ea0741b): its "
                "pace recorded (N 5 -> 0 in 4 back-offs: the filling steps took 669 us against 423 timed without "
                "it); E (e1fc44a): the back-off gone (N only lowered to what 3/4 of a window's step fits), auto the "
                "default.",
        "q4": {"A": offload(A / "offload-layout-q4-fill.json"), "B": offload(B / "offload-layout-q4-fill2.json"),
               "D": offload(D / "offload-layout-q4-fill3.json"), "E": offload(E / "offload-layout-q4-auto.json")},
        "bf16": {"B": offload(B / "offload-bf16-default.json"), "E": offload(E / "offload-bf16-auto.json")},
    }
    e = fill["q4"]["E"]["runs"]
    fill["auto_over_off_q4"] = round(e["default"]["decode_tok_s"] / e["lru/device"]["decode_tok_s"], 3)
    fill["auto_over_fill6_q4"] = round(e["default"]["decode_tok_s"] / e["lru+fill6/device"]["decode_tok_s"], 3)
    fill["bf16_default_E_over_B"] = round(fill["bf16"]["E"]["runs"]["default"]["decode_tok_s"]
                                          / fill["bf16"]["B"]["runs"]["default"]["decode_tok_s"], 3)
    fill["note"] = ("E, one call: q4 default (auto, N 5) against lru/device (the fill off) and fixed 6 / 8; bf16 "
                    "default (auto with CPU experts auto; its table is full after the prefill) in E against B's "
                    "default (the fill off then). bf16 default runs differ in tokens from lru/off (CPU experts: "
                    "summation order), as in sessions 11-14.")
    fill["reproduce"] = ("TIERED_COMMIT=<commit> bash benchmarks/lease/s19_callE.sh on a cold box (carry .carry/shared); "
                         "A, B, D: s19_callA.sh, s19_callB.sh, s19_callD.sh")
    (out_dir / "offload-fill-auto-2026-12-02-h200-s19.json").write_text(json.dumps(fill, indent=1) + "\n")

    c = {f.stem.removeprefix("tiered-"): decode(f) for f in sorted(C.glob("tiered-*-*.json"))}
    d = {f.stem.removeprefix("tiered-"): decode(f) for f in sorted(D.glob("tiered-*-*.json"))}
    q4 = c["q4-default"]["decode_short_tok_s"]
    bf = c["bf16-default"]["decode_short_tok_s"]
    quant = {
        "bench": "bench_peers.py --tiered-only vram (peers_vram in benchmarks/lease/lib.sh): decode_short = 32 new "
                 "tokens after a 64-token prompt, median of 3; every expert in VRAM",
        "date": "2026-12-02", "session": 19, "device": DEVICE, "model": MODEL,
        "what": "C (add0e8f): the attention split kernel loads the length, block table and first tile's older keys "
                "and values before its PDL wait (TIERED_PRELOAD=0 turns it off; bf16 runs no q4 kernel, so bf16 "
                "default against nopre isolates it); the word tile's nibbles in pairs (QConfig.conv 2) through "
                "TIERED_QCONFIG: pairlm = the lm_head at TUNED's tile, pairall = every word GEMV and gate_up, "
                "pairlm16 = the lm_head at bg 16. D (ea0741b): pairlm16 against the default, twice each.",
        "C": c, "D": d,
        "q4_vs_bf16_decode": round(q4 / bf, 3),
        "q4_vs_bf16_decode_note": f"call C, one call: q4+q4 {q4} against bf16 {bf} (goal 2.5x: missed)",
        "attention_preload_bf16": round(bf / c["bf16-nopre"]["decode_short_tok_s"], 4),
        "pairs_lm_head": round(c["q4-pairlm"]["decode_short_tok_s"] / q4, 4),
        "pairs_all": round(c["q4-pairall"]["decode_short_tok_s"] / q4, 4),
        "pairs_lm_head_bg16_D": round((d["q4-pairlm16"]["decode_short_tok_s"] + d["q4-pairlm16b"]["decode_short_tok_s"])
                                      / (d["q4-default"]["decode_short_tok_s"] + d["q4-default2"]["decode_short_tok_s"]), 4),
        "tests_B": {"attention, pdl, attention decode": summary(B / "tests-attn.log"),
                    "quant words, pairs, preload": summary(B / "tests-quant.log"),
                    "device step fill (cuda)": summary(B / "tests-fill.log")},
        "tests_note": "B at add0e8f on the H200 (unmarked tests run on CUDA there). The one failure, "
                      "test_piecewise_graphs_captured_before_the_first_token, was a CPU test asking CUDA for a CPU "
                      "device's reserved memory on a box with a GPU (decode/piecewise.py _reserved; fixed in ea0741b).",
        "reproduce": "TIERED_COMMIT=<commit> bash benchmarks/lease/s19_callA.sh, then s19_callC.sh on the warm box "
                     "(carry .carry/shared); D: s19_callD.sh",
    }
    (out_dir / "quant-pairs-attn-2026-12-02-h200-s19.json").write_text(json.dumps(quant, indent=1) + "\n")
    print(json.dumps({k: v for k, v in {**fill, **quant}.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
