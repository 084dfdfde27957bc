"""SASS instructions per input of the q4 decode GEMV (tiered/kernels/quant_moe.py `_qgemv`), compiled for sm_90
without a GPU: the evidence behind the word tile (QConfig.algo = 2) against the flat tile (algo 1).

Compiles the kernel as a launch would (pointers and arguments divisible by 16 carry Triton's 16-byte divisibility
specialisation, so code loads vectorise), disassembles it with the cuobjdump that ships with Triton, and prints per
tile: the static instruction count of one program (the rows' steps are unrolled), inputs per thread, instructions per
input, and the most frequent opcodes. Static counts: a guide to the arithmetic per input, not a timing.

    python3 tools/count_sass.py                                   # flat vs word tiles, lm_head-like rows (K 2048)
    python3 tools/count_sass.py --k 4096 --tiles 1:8:32:4,2:8:32:4    # algo:bn:bg:warps[:conv]
    python3 tools/count_sass.py --tiles 2:32:32:4,2:32:32:4:2          # the lm_head tile, nibbles in pairs
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

# a script: kernels decorated at import (fused_norm, pdl) must be compiled, not interpreted, so before tiered loads
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as launches compile: multiply-adds fused
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

def count(k: int, n: int, algo: int, bn: int, bg: int, warps: int,
          conv: int = 1) -> tuple[int, float, collections.Counter]:
    """(static SASS instructions of one program, inputs per thread, opcode counts) of _qgemv over a q4 [n, k]."""
    import torch
    from kernel_regs import compile_sm90, compiling, sass_ops

    from tiered.kernels import quant_moe as qm
    from tiered.layout.quant import quantize

    with compiling():
        qgemv = qm.decorate_kernels()[0]
    w = quantize(torch.randn(n, k) * k ** -0.5, "q4")
    cfg = qm.QConfig(bn=bn, bg=bg, warps=warps, algo=algo, conv=conv)
    tiles = qm._tiles(cfg, w)
    a = tiles["ALGO"]
    x = torch.zeros(1, k, dtype=torch.bfloat16)
    names = ("stride_qs", "stride_qn", "stride_ss", "stride_sn", "stride_ms", "stride_mn")
    args = {"x_ptr": x, "slot_ptr": x, "q_ptr": qm._codes(w, a), "s_ptr": w.scale, "m_ptr": w.min, "out_ptr": x,
            "N": n, "stride_xt": k, "stride_ot": n, **dict(zip(names, qm._strides(w, a)))}
    consts = {**qm._geometry(w), **tiles, "HAS_SLOTS": False}
    with compiling():
        ops = sass_ops(compile_sm90(qgemv, args, consts, warps))
    return sum(ops.values()), bn * k / (32 * warps), ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=2048, help="inputs per row")
    ap.add_argument("--n", type=int, default=1024, help="rows (only the grid depends on it)")
    ap.add_argument("--tiles", default="1:4:32:2,2:4:32:2,1:32:32:8,2:32:32:8",
                    help="comma list of algo:bn:bg:warps[:conv] (conv 2: the word tile's nibbles in pairs)")
    a = ap.parse_args()
    for spec in a.tiles.split(","):
        algo, bn, bg, warps, *rest = (int(v) for v in spec.split(":"))
        conv = rest[0] if rest else 1
        total, per_thread, ops = count(a.k, a.n, algo, bn, bg, warps, conv)
        top = ", ".join(f"{o} {c}" for o, c in ops.most_common(8))
        print(f"algo {algo} bn {bn:>2} bg {bg:>2} warps {warps} conv {conv}: {total:>5} instructions, {per_thread:.0f} "
              f"inputs per thread, {total / per_thread:.2f} per input  ({top})")


if __name__ == "__main__":
    main()
