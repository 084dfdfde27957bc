"""The q4 decode kernels under Nsight Compute: what holds each one back (memory, issue, latency, occupancy).

Runs, eagerly, the kernels of one q4 decode token at the 10.6B shape: the experts' gate_up and down (quant_moe.py,
TUNED tiles, K = 8 of a pool larger than L2, each call on other slots), and the q4 GEMVs of the dense matrices
(lm_head 151936 x 2048, qkv 5120 x 2048, o_proj 2048 x 4096), REPS times each, so that ncu can profile the later
launches with warm compiles. Every result is checked against the dequantize-then-matmul reference first.

    ncu --clock-control none --kernel-name regex:'_qgate_up|_qdown|_qgemv' --launch-skip 6 --launch-count 8 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        --section LaunchStats python3 tools/ncu_quant_kernels.py
    python3 tools/ncu_quant_kernels.py --reps 3          # without ncu: the same launches, a correctness check

TIERED_PDL is set to 0 here (ncu serialises kernels; PDL would only blur what a kernel does alone).
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

from tiered.kernels.quant_moe import quant_down, quant_gate_up, quant_matvec, quant_matvec_ref  # noqa: E402
from tiered.layout.format import plan_block  # noqa: E402
from tiered.layout.quant import quantize  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402

D, F, K, S = 2048, 768, 8, 128
DENSE = {"lm_head": (151936, 2048), "qkv": (5120, 2048), "o_proj": (2048, 4096)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8, help="launches of each kernel")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ncu_quant_kernels.py: needs a CUDA device")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    specs, bs = plan_block({"gate": ((F, D), "q4"), "up": ((F, D), "q4"), "down": ((D, F), "q4")})
    pool = torch.zeros(S, bs, dtype=torch.uint8, device=dev)
    W = expert_views(pool, specs)
    for w in (W.gate, W.up, W.down):
        q = quantize(torch.randn(w.shape, generator=g, device=dev) * w.matrix[1] ** -0.5 * 2, "q4")
        for name, t in q.parts().items():
            w.parts()[name].copy_(t)
    x = torch.randn(1, D, generator=g, device=dev).bfloat16()
    wts = torch.softmax(torch.randn(1, K, generator=g, device=dev), -1)
    perm = torch.randperm(S, generator=g, device=dev)
    for r in range(a.reps):  # each launch on other slots: the experts' bytes come from HBM, not L2
        slots = perm[(r * K) % (S - K):(r * K) % (S - K) + K][None].contiguous()
        h = quant_gate_up(x, slots, W.gate, W.up)
        y = quant_down(h, slots, wts, W.down, torch.float32)
        if r == 0:
            ref = torch.zeros(1, D, device=dev)
            for k, s in enumerate(slots[0].tolist()):
                gw, uw, dw = (w[s].dequantize(torch.float32) for w in (W.gate, W.up, W.down))
                xf = x.float()
                ref += wts[0, k] * (torch.nn.functional.silu(xf @ gw.T) * (xf @ uw.T)) @ dw.T
            err = float((y - ref).norm() / ref.norm())
            print(f"experts: rel err {err:.2e}", flush=True)
            if err > 2e-2:
                raise SystemExit(f"ncu_quant_kernels.py: the expert kernels disagree with the reference ({err:.3g})")
    del pool, W
    for name, (n, k) in DENSE.items():
        wq = quantize(torch.randn(n, k, generator=g, device=dev) * k ** -0.5, "q4")
        xv = torch.randn(1, k, generator=g, device=dev).bfloat16()
        for r in range(a.reps):
            out = quant_matvec(xv, wq)
            if r == 0:
                ref = quant_matvec_ref(xv, wq)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                print(f"{name}: rel err {err:.2e}", flush=True)
                if err > 2e-2:
                    raise SystemExit(f"ncu_quant_kernels.py: the {name} GEMV disagrees with the reference ({err:.3g})")
        del wq
    torch.cuda.synchronize()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
