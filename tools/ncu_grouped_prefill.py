"""The grouped prefill expert kernels under Nsight Compute: why a quantized pool's kernels run slower than bf16's at
many rows an expert (session 33: q4 787 us a layer against bf16's 543 at the 10.6B shape, 2,048 tokens).

Runs, eagerly, one layer's experts (E experts, slot = expert, bench_quant_kernels.layer_pool) at T tokens with
uniform random top-K routing, in each format named, REPS times each after a check against the fp32 loop over the
first 16 tokens' experts (dequantized), so that ncu can profile the later, warm launches.

    ncu --clock-control none --kernel-name regex:'grouped' --launch-skip 4 --launch-count 4 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        --section InstructionStats --section LaunchStats --section MemoryWorkloadAnalysis \\
        python3 tools/ncu_grouped_prefill.py --formats q4 --reps 4
    python3 tools/ncu_grouped_prefill.py --formats q4 --tile m128:n64:k64:w4:s4:swap5:ps1   # one tile, no ncu

Each rep launches two kernels (gate_up, down), and ncu's launch counts run over every format named: profile one
format a run (session 35 named bf16,q4 with --launch-skip 4 --launch-count 4 and got bf16's kernels only).

Each format runs its picked tiles (moe_grouped.bf16_config / quant_grouped.pick_qconfig) unless --tile names one
(quant_grouped.parse_few's spec) for the quantized formats. TIERED_PDL is set to 0 (ncu serialises kernels).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TIERED_PDL", "0")
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="bf16,q4", help="comma list of bf16, q8, q4, mxfp4, fp8")
    ap.add_argument("--shape", default="10.6B", help="bench_quant_kernels.PREFILL_SHAPES key")
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens T (rows: T * top-k)")
    ap.add_argument("--reps", type=int, default=8, help="launches of each format's pair of kernels")
    ap.add_argument("--tile", default="", help="the quantized formats' tiles, e.g. m128:n64:k64:w4:s4:swap5")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_grouped_prefill.py: needs a CUDA device")
    from bench_quant_kernels import PREFILL_SHAPES, layer_pool, prefill_inputs, ref_tokens, rel

    from tiered.kernels.moe_grouped import moe_grouped
    from tiered.kernels.quant_grouped import moe_grouped_quant, parse_few

    if a.shape not in PREFILL_SHAPES:
        raise SystemExit(f"--shape: one of {', '.join(PREFILL_SHAPES)}, not {a.shape!r}")
    D, Fe, E, K = PREFILL_SHAPES[a.shape]
    x, ids, w, distinct = prefill_inputs(a.shape, [a.tokens])[a.tokens]
    slot_map = torch.arange(E, device=x.device)
    cfg = parse_few(a.tile) if a.tile else None
    for fmt in [f for f in a.formats.split(",") if f]:
        pool, W = layer_pool(fmt, E, D, Fe)
        for r in range(a.reps):
            out = (moe_grouped(x, ids, w, W, slot_map) if fmt == "bf16"
                   else moe_grouped_quant(x, ids, w, W, slot_map, cfg))
            if r == 0:
                err = rel(out[:16].float(), ref_tokens(x[:16], ids[:16], w[:16], W))
                print(f"{a.shape} T {a.tokens} {fmt}: rel err {err:.2e} ({distinct} experts)", flush=True)
                if not err <= 2e-2:
                    raise SystemExit(f"ncu_grouped_prefill.py: {fmt}'s grouped kernels disagree with the reference "
                                     f"({err:.3g})")
        torch.cuda.synchronize()
        del pool, W
        torch.cuda.empty_cache()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
