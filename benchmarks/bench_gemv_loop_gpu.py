"""q4 dense GEMVs with programs that loop over row blocks (QConfig.persist, gemv_loop) against a program a block (GPU).

    python3 benchmarks/bench_gemv_loop_gpu.py                      # lm_head, qkv, o_proj: about 2 minutes on an H200
    python3 benchmarks/bench_gemv_loop_gpu.py --only lm_head

A program a row block (TUNED's tiles) waits for its first step of codes when it starts and idles at its end, and
the lm_head (151936 x 2048, 4,748 blocks of 32 rows) runs as 9 waves of such programs. Under QConfig.persist P at
most P programs a SM each take every (P x SMs)-th block, with the next block's first step (codes, scales, minima)
loaded before the current one is computed (quant_moe.gemv_loop), so their loads stay in flight from one block to
the next; with QConfig.ahead each also asks L2 for the rows of its block that many turns ahead (no registers held).
The float word tile (conv 1 and 2) and the 8-bit inputs (act 1) are both timed; and TUNED's tile (a program a
block) with L2 prefetches of a later wave's rows before its PDL wait (QConfig.ahead without persist).

Each variant is first checked against the plain reference (dequantized rows, fp32 products; act 1 over the inputs
rounded by round_inputs_q8) with fp32 outputs; a variant that misses (relative error over 1e-4; conv 2: 1e-4 too,
its sums keep 4 bits less) is reported as failed and not timed. Timed as a CUDA graph of calls on other copies of
the matrix (the lm_head: 2 copies, 350 MB, past L2), the TUNED default first and again last (its faster run kept:
session 15 saw a first-row position effect).

Prints a row per variant and one JSON line; writes $OUT/gemv_loop.json when OUT is set. Its "best" holds per product
the fastest variant against the default, and "qconfig" a TIERED_QCONFIG value with each winner (where it beats the
default by more than 2%).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmeta import git_commit, write_out  # noqa: E402
from bench_act8_gpu import time_configs  # noqa: E402
from tiered.kernels import quant_moe as qm  # noqa: E402
from tiered.kernels.quant_moe import QConfig  # noqa: E402

DENSE = {"lm_head": (151936, 2048), "qkv": (5120, 2048), "o_proj": (2048, 4096)}
# (bn, bg, warps, conv, persist, act, ahead): offline (tools/kernel_regs.py, Triton 3.9, sm_90) the lm_head tiles
# below fit P programs a SM by registers (bn 16 bg 16 w 4: 128 registers, 4 a SM; bn 16 bg 32 w 4: 168, 3; bn 32 bg
# 16 w 4: 255, 2; bn 8 bg 32 w 4: 128, 4). ahead: L2 prefetches of the block that many turns ahead; with persist 0
# (TUNED's tile, 528 programs resident: 4 a SM), of the block that many blocks later. Session 42's first sweep (H100,
# s42_callA) timed the loop without them: 75.7-100 us against TUNED's 70.8.
LOOP_TILES = {
    "lm_head": [(16, 16, 4, 1, 4, 0, 0), (16, 16, 4, 1, 4, 0, 1), (16, 16, 4, 1, 4, 0, 2), (16, 16, 4, 1, 4, 0, 4),
                (16, 16, 4, 2, 4, 0, 2), (32, 16, 4, 2, 2, 0, 0), (32, 16, 4, 2, 2, 0, 1), (32, 16, 4, 2, 2, 0, 2),
                (16, 32, 4, 2, 3, 0, 2), (8, 32, 4, 2, 4, 0, 2), (8, 32, 4, 2, 4, 0, 4), (16, 16, 4, 0, 4, 1, 0),
                (16, 16, 4, 0, 4, 1, 2), (32, 16, 4, 2, 0, 0, 264), (32, 16, 4, 2, 0, 0, 528),
                (32, 16, 4, 2, 0, 0, 1056)],
    "qkv": [(8, 32, 4, 1, 2, 0, 0), (4, 32, 4, 1, 4, 0, 1)],
    "o_proj": [(4, 64, 4, 1, 2, 0, 0), (4, 64, 4, 1, 2, 0, 1)],
}


def variants(name: str) -> list[QConfig]:
    n, k = DENSE[name]
    base = qm.pick_config("gemv", "q4", k, n)
    out = [base]
    for bn, bg, warps, conv, persist, act, ahead in LOOP_TILES[name]:
        out.append(QConfig(bn=bn, bg=bg, warps=warps, algo=2, conv=conv or 1, persist=persist, act=act, ahead=ahead))
    return out


def time_product(name: str, layers: int) -> list[dict]:
    n, k = DENSE[name]
    cfgs = variants(name)
    rows = time_configs(name, n, k, cfgs + [cfgs[0]], layers)  # the default again last
    for i, r in enumerate(rows):
        r["default"] = i in (0, len(cfgs))
        if "gbps" in r:
            r["tbps"] = r["gbps"] / 1e3
    return rows


def summarize(rows: list[dict]) -> tuple[dict, str]:
    best, entries = {}, []
    for name, (n, k) in DENSE.items():
        mine = [r for r in rows if r["product"] == name and "us" in r]
        base = min((r for r in mine if r["default"]), key=lambda r: r["us"], default=None)
        other = min((r for r in mine if not r["default"]), key=lambda r: r["us"], default=None)
        if base and other:
            best[name] = {"default_us": base["us"], "best_us": other["us"], "speedup": base["us"] / other["us"],
                          "default": base["config"], "config": other["config"]}
            if other["us"] < base["us"] / 1.02:
                entries.append(f"gemv,q4,{k},{n}:" + ",".join(f"{f}={v}" for f, v in other["config"].items()))
    return best, ";".join(entries)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="calls per graph, each on another copy")
    ap.add_argument("--only", default="lm_head,qkv,o_proj", help="products to time")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemv_loop_gpu.py times CUDA kernels: run it on the GPU box")
    t0 = time.time()
    rows = []
    for name in args.only.split(","):
        rows += time_product(name, args.layers)
    best, qconfig = summarize(rows)
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
           "seconds": round(time.time() - t0, 1), "rows": rows, "best": best, "qconfig": qconfig}
    for k, v in best.items():
        print(f"{k}: default {v['default_us']:.1f} us, best loop {v['best_us']:.1f} us ({v['speedup']:.2f}x) "
              f"{v['config']}")
    print("TIERED_QCONFIG=" + qconfig)
    print(write_out(out, "gemv_loop.json"))


if __name__ == "__main__":
    main()
