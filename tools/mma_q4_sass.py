"""Offline probe (no GPU): would the q4 decode GEMV gain from tensor cores? SASS instructions per input of a q4 GEMV
whose codes become bf16 values (128 + c: one shift and one lop3 a pair, inline PTX) for tl.dot, with x placed
block-diagonally in B [128, 16] (column = group mod 16), so the MMA's [BN, 16] accumulator holds each row's dot
with each group and the scales and minima apply once every 16 groups. Compiled for sm_90 (Triton's ptxas and
cuobjdump) at the lm_head's shape, against the word tile's count from tools/count_sass.py.

    python3 tools/mma_q4_sass.py

Session 43 (Triton 3.9): 3.83-4.58 SASS per input with the inline pairs (STS 1.2-1.4 an input, PRMT 0.5-0.65:
the bf16 tile goes through shared memory to reach wgmma's operand layout), 6.4-7.2 with plain integer ops (I2F
too), against 3.66-3.69 for the word tile (algo 2, conv 2). So the tensor-core route does not cut instructions in
Triton unless the codes are stored in the operand's fragment order (a layout change); not built. The kernel below
is a probe: its inline pairs were never run on a GPU.
"""
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

ASM_PAIR = tl.constexpr("{ .reg .b32 t; shr.b32 t, $1, $3; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }")


@triton.jit
def mma_gemv(x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_qn, stride_sn, stride_mn,
             KW: tl.constexpr, NG: tl.constexpr, BN: tl.constexpr, SUB: tl.constexpr, COLS: tl.constexpr,
             ASM: tl.constexpr, F32: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    mrow = rows < N
    r64 = tl.where(mrow, rows, 0).to(tl.int64)
    wi = tl.arange(0, SUB)
    jj = tl.arange(0, 4)
    hh = tl.arange(0, 2)
    perm = tl.reshape(8 * wi[:, None, None] + jj[None, :, None] + 4 * hh[None, None, :], [SUB * 8])
    pw = tl.reshape(wi[:, None] + 0 * tl.arange(0, 8)[None, :], [SUB * 8])  # the word of each position
    col = tl.arange(0, COLS)
    out = tl.zeros([BN], tl.float32)
    acc = tl.zeros([BN, COLS], tl.float32)
    for k0 in tl.static_range(0, KW, SUB):
        wd = tl.load(q_ptr + r64[:, None] * stride_qn + k0 + wi[None, :])  # [BN, SUB] int32
        if ASM:
            w4 = tl.broadcast_to(wd[:, :, None, None], [BN, SUB, 4, 2])
            sh = tl.broadcast_to((4 * jj)[None, None, :, None], [BN, SUB, 4, 2])
            cb = tl.inline_asm_elementwise(ASM_PAIR, "=r,r,r,r,r", [w4, sh], dtype=tl.bfloat16, is_pure=True,
                                           pack=2)
        else:
            shf = (4 * jj)[:, None] + 16 * hh[None, :]
            cb = (((wd[:, :, None, None] >> shf[None, None, :, :]) & 0xF) + 128).to(tl.bfloat16)
        a = tl.reshape(cb, [BN, SUB * 8])
        xv = tl.load(x_ptr + k0 * 8 + perm)  # bf16 [SUB*8]
        grp = (k0 + pw) // 8  # [SUB*8]
        b = tl.where((grp % COLS)[:, None] == col[None, :], xv[:, None], 0.0).to(tl.bfloat16)  # [SUB*8, COLS]
        if F32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
        if (k0 + SUB) % (COLS * 8) == 0 or k0 + SUB == KW:  # 16 groups done (or the row's end)
            g0 = (k0 + SUB) // 8 - COLS
            gs = g0 + col
            gm = gs < NG
            xg = tl.load(x_ptr + gs[:, None] * 64 + tl.arange(0, 64)[None, :], mask=gm[:, None], other=0.0)
            xs = tl.sum(xg.to(tl.float32), axis=1)  # [COLS]
            sv = tl.load(s_ptr + r64[:, None] * stride_sn + gs[None, :], mask=gm[None, :], other=0.0).to(tl.float32)
            mv = tl.load(m_ptr + r64[:, None] * stride_mn + gs[None, :], mask=gm[None, :], other=0.0).to(tl.float32)
            out += tl.sum(sv * (acc - 128.0 * xs[None, :]) + mv * xs[None, :], axis=1)
            acc = tl.zeros([BN, COLS], tl.float32)
    tl.store(out_ptr + rows, out, mask=mrow)


def main() -> None:
    import torch
    from kernel_regs import compile_sm90, cuobjdump, sass_ops

    K, N = 2048, 151936
    x = torch.zeros(K, dtype=torch.bfloat16)
    q = torch.zeros(N, K // 8, dtype=torch.int32)
    s = torch.zeros(N, K // 64, dtype=torch.bfloat16)
    args = {"x_ptr": x, "q_ptr": q, "s_ptr": s, "m_ptr": s, "out_ptr": x, "N": N, "stride_qn": K // 8,
            "stride_sn": K // 64, "stride_mn": K // 64}
    for asm in (True, False):
        for bn, sub, warps in ((64, 16, 4), (128, 16, 4), (128, 16, 8), (128, 32, 8)):
            cub = compile_sm90(mma_gemv, args, {"KW": K // 8, "NG": K // 64, "BN": bn, "SUB": sub, "COLS": 16,
                                                "ASM": asm, "F32": False}, warps)
            ops = sass_ops(cub)
            total = sum(ops.values())
            regs = [w for line in cuobjdump(cub, "-res-usage").splitlines() for w in line.split()
                    if w.startswith("REG")]
            name = "inline pairs" if asm else "integer ops "
            print(f"{name} bn {bn:3d} sub {sub} warps {warps}: {total} instructions, "
                  f"{total / (bn * K / (32 * warps)):.2f} per input, {regs[0] if regs else ''}; "
                  + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))


if __name__ == "__main__":
    main()
