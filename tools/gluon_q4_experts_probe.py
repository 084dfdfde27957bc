"""The experts' gate_up and down products on tensor cores in Gluon, with K split across warps: a probe for issue 13
beside tools/gluon_q4_probe.py (the dense GEMV), not used by the engine.

    python3 tools/gluon_q4_experts_probe.py          # offline: SASS per input for sm_90, the index math on CPU
    python3 tools/gluon_q4_experts_probe.py --gpu    # on the GPU box: checked against the reference, then timed
                                                     # against TUNED's quant_gate_up / quant_down (8 experts)

Why a second layout: gate_up's experts have 768 rows each, so the dense probe's blocks of 64+ rows stacked over 4
warps leave too few programs (and loads in flight). Here the 4 warps of a program take the same 32 rows (16 gate
rows and the 16 up rows of the same FFN index) and each its own quarter of K: the operands are batched, [4 (warp),
rows, K], so mma_v2 runs each warp's K slice as one batch element, and one cross-warp sum ends the program.
- A [4, 32, 64] in DotOperandLayout(0, mma v2 [4, 1, 1], k_width 8): a thread holds one stored word of a row, as in
  the dense probe (same words, same pairs: one shift and one lop3 a pair, 128 + c in bf16).
- B [4, 64, 8]: warp b's x for its step's group in column step mod 8 (a masked 16-byte load a thread).
- After each 8 groups the scales and minima apply; after the last, the warps' sums are added, and since the rows
  16 apart (a gate row and its up row) sit in one thread, h = silu(gate) * up is taken there and stored.
Programs: (F / 16 row blocks) x (8 experts): 384 programs of 4 warps at the 10.6B shape (TUNED's gate_up: 768 of
4). Needs D a multiple of 4 x 64 (each warp the same number of groups), groups of 64, bf16 x.
down: 8 warps, warp k taking expert k's rows and h[k] (fp32, rounded to bf16 for the tensor cores), its routing
weight applied in its epilogue, the warps' sums added: 16 rows a program, 128 programs of 8 warps at the 10.6B shape.
Offline (sm_90, Triton 3.9): gate_up 2.05 SASS an input with the epilogue and silu (63 registers; 3.6: 2.03), down
2.69 (57 registers; h's conversion to bf16 included). The index math of both is emulated in torch against the
dequantized reference on CPU; the kernels themselves are checked only by --gpu.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "benchmarks"))
if "--gpu" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "0"  # offline: compile, never interpret (Gluon has no interpreter)

import torch  # noqa: E402

from gluon_q4_probe import GROUP, PAIR, gl, gluon, mma_v2, triton  # noqa: E402
from tiered.kernels.quant_gluon import emulate as emulate_rows  # noqa: E402

ROWS = 16  # FFN rows a program: 16 gate + 16 up
WARPS = 4  # K slices


def layouts(warps: int = WARPS, rows: int = 2 * ROWS) -> dict:
    """The layouts of a program of `rows` rows (16 or 32) whose `warps` warps each take a K slice: the operands are
    [warps, rows, 64] with the warps on the batch dimension (see the docstring)."""
    if warps not in (4, 8) or rows not in (16, 32):
        raise ValueError(f"warps 4 or 8 and rows 16 or 32, got {warps}, {rows}")
    wb = [[1 << i] for i in range(warps.bit_length() - 1)]  # the batch (K slice) bits on the warps

    def pad(v, n):  # a basis vector of rank n: v's entries first
        return v + [0] * (n - len(v))

    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1, 1], instr_shape=[1, 16, 8])
    r16 = [[0, 16]] if rows == 32 else []
    # words [W (b), R (row), 4 (t), 2 (h)]: word 2t + h of the step's group
    w0 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1], [0, 8, 0, 0]] + [pad(v, 4) for v in r16],
                                    lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]],
                                    warp_bases=[pad(v, 4) for v in wb], block_bases=[], shape=[warps, rows, 4, 2])
    # [W, R, 2 (h), 4 (t), 8 (l)] -> [W, R, 64] with k = 32 h + 8 t + l: A's layout
    l5 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 0, 4], [0, 8, 0, 0, 0],
                                               [0, 0, 1, 0, 0]] + [pad(v, 5) for v in r16],
                                    lane_bases=[[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0],
                                                [0, 4, 0, 0, 0]],
                                    warp_bases=[pad(v, 5) for v in wb], block_bases=[], shape=[warps, rows, 2, 4, 8])
    # x of a step [W (b), 2 (h), 4 (t), 8 (j), 8 (n)], stored order j
    xb5 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0], [0, 1, 0, 0, 0]],
                                     lane_bases=[[0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2],
                                                 [0, 0, 0, 0, 4]],
                                     warp_bases=[pad(v, 5) for v in wb], block_bases=[], shape=[warps, 2, 4, 8, 8])
    xg = gl.BlockedLayout(size_per_thread=[1, 1, 8], threads_per_warp=[1, 4, 8], warps_per_cta=[warps, 1, 1],
                          order=[2, 1, 0])
    return dict(MMA=mma, A_L=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8),
                B_L=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8), W0_L=w0, L5=l5, XB_L=xb5, XG_L=xg)


def _gate_up_kernel(x_ptr, slot_ptr, gq, gs, gm, uq, us, um, h_ptr, F, stride_qs, stride_qn, stride_ss, stride_sn,
                    KW: gl.constexpr, NG: gl.constexpr, PAIR: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr,
                    B_L: gl.constexpr, W0_L: gl.constexpr, L5: gl.constexpr, XB_L: gl.constexpr,
                    XG_L: gl.constexpr):
    """Program (fb, k): h[k, fb*16 .. +16] = silu(x . gate) * (x . up) of the token's k-th expert (slot_ptr[k])."""
    fb = gl.program_id(0)
    kk = gl.program_id(1)
    slot = gl.load(slot_ptr + kk)
    GPW: gl.constexpr = NG // 4  # groups a warp
    # the words: [4 (b), 32 (row), 4 (t), 2 (h)]
    W3: gl.constexpr = gl.SliceLayout(3, W0_L)
    b_w = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, W3)))
    r_w = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, W3)))
    t_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, W3)))
    h_w = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, W0_L))))
    f_w = fb * 16 + r_w % 16
    fw = gl.where(f_w < F, f_w, 0).to(gl.int64)
    row_off = slot * stride_qs + fw * stride_qn  # [32]
    rbase = gl.where(r_w < 16, gq + row_off, uq + row_off)  # [32] pointers: gate rows, then up rows
    col = (b_w[:, None, None] * GPW * 8 + 2 * t_w[None, None, :])[:, :, :, None] + h_w[None, None, None, :]
    wptr = rbase[None, :, None, None] + col  # [4, 32, 4, 2]
    l_s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    sh = (4 * (l_s // 2))[None, None, None, None, :]
    # x: [4 (b), 2 (h), 4 (t), 8 (j), 8 (n)]
    X4: gl.constexpr = gl.SliceLayout(4, XB_L)
    b_x = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    h_x = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    t_x = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, X4))))
    j_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X4))))
    n_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, XB_L)))))
    xo3 = (b_x[:, None, None] * GPW * 64 + 8 * (2 * t_x[None, None, :] + h_x[None, :, None]))[:, :, :, None] \
        + j_x[None, None, None, :]  # [4, 2, 4, 8]
    xoff, n5 = gl.broadcast(xo3[:, :, :, :, None], n_x[None, None, None, None, :])
    # the epilogue: scales and minima [4, 32, 8] of groups b * GPW + e * 8 + n
    C2: gl.constexpr = gl.SliceLayout(2, MMA)
    r_c = gl.arange(0, 32, layout=gl.SliceLayout(0, C2))
    f_c = fb * 16 + r_c % 16
    fc = gl.where(f_c < F, f_c, 0).to(gl.int64)
    srow = slot * stride_ss + fc * stride_sn
    sbase = gl.where(r_c < 16, gs + srow, us + srow)  # [32]
    mbase = gl.where(r_c < 16, gm + srow, um + srow)
    b_c = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(1, MMA)))
    n_c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    XG2: gl.constexpr = gl.SliceLayout(2, XG_L)
    b_g = gl.arange(0, 4, layout=gl.SliceLayout(1, XG2))
    n_g = gl.arange(0, 8, layout=gl.SliceLayout(0, XG2))
    i_g = gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, XG_L)))
    tot = gl.zeros([4, 32], gl.float32, layout=C2)
    acc = gl.zeros([4, 32, 8], gl.float32, layout=MMA)
    for st in gl.static_range(GPW):  # each warp's st-th group
        w = gl.load(wptr + st * 8)  # [4, 32, 4, 2] int32
        w = gl.convert_layout(gl.permute(w, [0, 1, 3, 2]), gl.SliceLayout(4, L5), assert_trivial=True)
        w5, s5 = gl.broadcast(w[:, :, :, :, None], sh)
        cb = gl.inline_asm_elementwise(PAIR, "=r,r,r,r,r", [w5, s5], dtype=gl.bfloat16, is_pure=True, pack=2)
        a = gl.convert_layout(gl.reshape(cb, [4, 32, 64]), A_L, assert_trivial=True)
        xv = gl.load(x_ptr + st * 64 + xoff, mask=n5 == st % 8, other=0.0)  # [4, 2, 4, 8 (j), 8 (n)]
        xv = gl.reshape(gl.permute(gl.reshape(xv, [4, 2, 4, 2, 4, 8]), [0, 1, 2, 4, 3, 5]), [4, 64, 8])  # j -> l
        acc = mma_v2(a, gl.convert_layout(xv, B_L, assert_trivial=True), acc)
        if (st % 8 == 7) or (st == GPW - 1):
            g = b_c[:, None] * GPW + (st // 8) * 8 + n_c[None, :]  # [4, 8] each warp's groups
            gk = (g[:, None, :]).to(gl.int64)
            ok = ((((st // 8) * 8 + n_c) < GPW)[None, :])[:, None, :]
            sv = gl.load(sbase[None, :, None] + gk, mask=ok, other=0.0).to(gl.float32)  # [4, 32, 8]
            mv = gl.load(mbase[None, :, None] + gk, mask=ok, other=0.0).to(gl.float32)
            gx = b_g[:, None] * GPW + (st // 8) * 8 + n_g[None, :]  # [4, 8]
            okx = ((st // 8) * 8 + n_g[None, :]) < GPW
            xx = gl.load(x_ptr + gx[:, :, None] * 64 + i_g[None, None, :], mask=okx[:, :, None], other=0.0)
            xs = gl.convert_layout(gl.sum(xx.to(gl.float32), axis=2), gl.SliceLayout(1, MMA))  # [4, 8]
            tot += gl.sum(sv * (acc - 128.0 * xs[:, None, :]) + mv * xs[:, None, :], axis=2)
            acc = gl.zeros([4, 32, 8], gl.float32, layout=MMA)
    both = gl.sum(tot, axis=0)  # [32]: the warps' K slices added; rows 0-15 gate, 16-31 up
    gate, up = gl.split(gl.permute(gl.reshape(both, [2, 16]), [1, 0]))
    hv = gate / (1.0 + gl.exp(-gate)) * up
    f_o = fb * 16 + gl.arange(0, 16, layout=hv.type.layout)
    gl.store(h_ptr + kk * F + f_o, hv, mask=f_o < F)


def _down_kernel(h_ptr, slot_ptr, wt_ptr, dq, ds, dm, y_ptr, D, stride_qs, stride_qn, stride_ss, stride_sn,
                 KW: gl.constexpr, NG: gl.constexpr, PAIR: gl.constexpr, MMA: gl.constexpr, A_L: gl.constexpr,
                 B_L: gl.constexpr, W0_L: gl.constexpr, L5: gl.constexpr, XB_L: gl.constexpr, XG_L: gl.constexpr):
    """Program db: y[db*16 .. +16] = sum_k wt[k] (down_k . h[k]); warp k takes expert k (slot_ptr[k]) and h[k] (fp32,
    rounded to bf16 for the tensor cores); the warps' sums meet at the end."""
    db = gl.program_id(0)
    W3: gl.constexpr = gl.SliceLayout(3, W0_L)
    b_w = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, W3)))
    r_w = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, W3)))
    t_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, W3)))
    h_w = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, W0_L))))
    slot_w = gl.load(slot_ptr + b_w)  # [8] each warp's expert
    d_w = db * 16 + r_w
    dw = gl.where(d_w < D, d_w, 0).to(gl.int64)
    rbase = dq + slot_w[:, None] * stride_qs + dw[None, :] * stride_qn  # [8, 16] row pointers
    col = (2 * t_w[None, None, :])[:, :, :, None] + h_w[None, None, None, :]  # [1, 1, 4, 2]
    wptr = rbase[:, :, None, None] + col
    l_s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    sh = (4 * (l_s // 2))[None, None, None, None, :]
    X4: gl.constexpr = gl.SliceLayout(4, XB_L)
    b_x = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    h_x = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    t_x = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, X4))))
    j_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X4))))
    n_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, XB_L)))))
    xo3 = (b_x[:, None, None] * (KW * 8) + 8 * (2 * t_x[None, None, :] + h_x[None, :, None]))[:, :, :, None] \
        + j_x[None, None, None, :]  # [8, 2, 4, 8]: h[k] at its inputs
    xoff, n5 = gl.broadcast(xo3[:, :, :, :, None], n_x[None, None, None, None, :])
    C2: gl.constexpr = gl.SliceLayout(2, MMA)
    b_c = gl.arange(0, 8, layout=gl.SliceLayout(1, C2))
    r_c = gl.arange(0, 16, layout=gl.SliceLayout(0, C2))
    slot_c = gl.load(slot_ptr + b_c)
    d_c = db * 16 + r_c
    dc = gl.where(d_c < D, d_c, 0).to(gl.int64)
    srow = slot_c[:, None] * stride_ss + dc[None, :] * stride_sn  # [8, 16]
    n_c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    XG2: gl.constexpr = gl.SliceLayout(2, XG_L)
    b_g = gl.arange(0, 8, layout=gl.SliceLayout(1, XG2))
    n_g = gl.arange(0, 8, layout=gl.SliceLayout(0, XG2))
    i_g = gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, XG_L)))
    tot = gl.zeros([8, 16], gl.float32, layout=C2)
    acc = gl.zeros([8, 16, 8], gl.float32, layout=MMA)
    for st in gl.static_range(NG):
        w = gl.load(wptr + st * 8)  # [8, 16, 4, 2] int32
        w = gl.convert_layout(gl.permute(w, [0, 1, 3, 2]), gl.SliceLayout(4, L5), assert_trivial=True)
        w5, s5 = gl.broadcast(w[:, :, :, :, None], sh)
        cb = gl.inline_asm_elementwise(PAIR, "=r,r,r,r,r", [w5, s5], dtype=gl.bfloat16, is_pure=True, pack=2)
        a = gl.convert_layout(gl.reshape(cb, [8, 16, 64]), A_L, assert_trivial=True)
        xv = gl.load(h_ptr + st * 64 + xoff, mask=n5 == st % 8, other=0.0).to(gl.bfloat16)  # [8, 2, 4, 8, 8]
        xv = gl.reshape(gl.permute(gl.reshape(xv, [8, 2, 4, 2, 4, 8]), [0, 1, 2, 4, 3, 5]), [8, 64, 8])  # j -> l
        acc = mma_v2(a, gl.convert_layout(xv, B_L, assert_trivial=True), acc)
        if (st % 8 == 7) or (st == NG - 1):
            gn = (st // 8) * 8 + n_c  # [8] the groups of these columns
            ok = ((gn < NG)[None, :])[:, None, :]
            gk = (gn[None, :])[:, None, :].to(gl.int64)
            sv = gl.load(ds + srow[:, :, None] + gk, mask=ok, other=0.0).to(gl.float32)  # [8, 16, 8]
            mv = gl.load(dm + srow[:, :, None] + gk, mask=ok, other=0.0).to(gl.float32)
            gx = (st // 8) * 8 + n_g
            okx = (gx < NG)[None, :]
            hx = gl.load(h_ptr + b_g[:, None, None] * (KW * 8) + gx[None, :, None] * 64 + i_g[None, None, :],
                         mask=okx[:, :, None], other=0.0)
            xs = gl.convert_layout(gl.sum(hx.to(gl.bfloat16).to(gl.float32), axis=2), gl.SliceLayout(1, MMA))
            tot += gl.sum(sv * (acc - 128.0 * xs[:, None, :]) + mv * xs[:, None, :], axis=2)
            acc = gl.zeros([8, 16, 8], gl.float32, layout=MMA)
    wt = gl.load(wt_ptr + b_c)  # [8] routing weights
    y = gl.sum(tot * wt[:, None], axis=0)  # [16]
    d_o = db * 16 + gl.arange(0, 16, layout=y.type.layout)
    gl.store(y_ptr + d_o, y, mask=d_o < D)


KERNEL = DOWN = None
if gluon is not None:
    KERNEL = gluon.jit(_gate_up_kernel)
    DOWN = gluon.jit(_down_kernel)


def _check(x, gate, up) -> None:
    e, d = gate.q.shape[0], gate.matrix[1]
    if gate.fmt != "q4" or gate.group != GROUP or d % (WARPS * GROUP) or up.matrix != gate.matrix:
        raise ValueError(f"the probe takes q4 gate/up stacks with groups of {GROUP} and D a multiple of "
                         f"{WARPS * GROUP}; got {gate.fmt}, group {gate.group}, {e} x {tuple(gate.matrix)}")


def gate_up(x, slots, gate, up):
    """x [D] bf16, slots [K] int64 (CUDA), gate/up q4 stacks [E, F, D] -> h [K, F] fp32 (silu(gate) * up)."""
    from tiered.kernels import quant_moe as qm

    _check(x, gate, up)
    f, d = gate.matrix
    gq, uq = qm._codes(gate, 2), qm._codes(up, 2)
    h = torch.empty(slots.numel(), f, dtype=torch.float32, device=x.device)
    KERNEL[(triton.cdiv(f, ROWS), slots.numel())](x, slots, gq, gate.scale, gate.min, uq, up.scale, up.min, h, f,
                                                  gq.stride(0), gq.stride(1), gate.scale.stride(0),
                                                  gate.scale.stride(1), KW=d // 8, NG=d // GROUP, PAIR=PAIR,
                                                  **layouts(), num_warps=WARPS)
    return h


def emulate(x, slots, gate, up):
    """The kernel's logical computation in torch (CPU): each warp's K quarter through quant_gluon.emulate (the same
    word, nibble and x indices, the 8-group epilogue with its 128 offset), the warps' sum, silu(gate) * up. fp64."""
    f, d = gate.matrix
    gpw = d // GROUP // WARPS
    out = []
    for s in slots.tolist():
        gate_row, up_row = (sum(emulate_rows(x, w[s], b * gpw, gpw) for b in range(WARPS)) for w in (gate, up))
        out.append(torch.nn.functional.silu(gate_row) * up_row)
    return torch.stack(out)


def reference(x, slots, gate, up):
    """silu(x . gate_k) * (x . up_k) with the dequantized rows (fp32), [K, F]."""
    xf = x.float()
    return torch.stack([torch.nn.functional.silu(gate[s].dequantize(torch.float32) @ xf)
                        * (up[s].dequantize(torch.float32) @ xf) for s in slots.tolist()])


def down(h, slots, wts, dw):
    """h [8, F] fp32, slots [8] int64, wts [8] fp32 (CUDA), dw q4 stack [E, D, F] -> y [D] fp32 = sum_k wts[k]
    (dw[slots[k]] . h[k]) with h rounded to bf16."""
    from tiered.kernels import quant_moe as qm

    d, f = dw.matrix
    if dw.fmt != "q4" or dw.group != GROUP or f % GROUP or slots.numel() != 8:
        raise ValueError(f"the down probe takes a q4 stack with groups of {GROUP}, F a multiple of it and 8 experts; "
                         f"got {dw.fmt}, group {dw.group}, {tuple(dw.matrix)}, {slots.numel()} experts")
    q = qm._codes(dw, 2)
    y = torch.empty(d, dtype=torch.float32, device=h.device)
    DOWN[(triton.cdiv(d, 16),)](h, slots, wts, q, dw.scale, dw.min, y, d, q.stride(0), q.stride(1),
                                dw.scale.stride(0), dw.scale.stride(1), KW=f // 8, NG=f // GROUP, PAIR=PAIR,
                                **layouts(8, 16), num_warps=8)
    return y


def emulate_down(h, slots, wts, dw):
    """The down kernel's logical computation in torch (CPU), fp64: warp k's expert through quant_gluon.emulate (the
    same words, nibbles and h offsets, h rounded to bf16, the 8-group epilogue), the routing weight, the warps'
    sum."""
    return sum(float(wts[b]) * emulate_rows(h[b].to(torch.bfloat16), dw[s]) for b, s in enumerate(slots.tolist()))


def reference_down(h, slots, wts, dw):
    """sum_k wts[k] (dequantized dw[slots[k]] @ round_bf16(h[k])) in fp32."""
    return sum(float(wts[b]) * (dw[s].dequantize(torch.float32) @ h[b].to(torch.bfloat16).float())
               for b, s in enumerate(slots.tolist()))


def cpu_check(seed: int = 0) -> dict:
    from tiered.layout.quant import quantize

    g = torch.Generator().manual_seed(seed)
    res = {}
    for e, f, d, k in ((3, 40, 256, 2), (4, 24, 2048, 3)):  # one epilogue a warp; a partial row block
        gate = quantize(torch.randn(e, f, d, generator=g) * d ** -0.5, "q4")
        up = quantize(torch.randn(e, f, d, generator=g) * d ** -0.5, "q4")
        x = torch.randn(d, generator=g).to(torch.bfloat16)
        slots = torch.randperm(e, generator=g)[:k]
        ref = reference(x, slots, gate, up).double()
        err = float((emulate(x, slots, gate, up) - ref).norm() / ref.norm())
        res[f"{e}x{f}x{d}"] = err
        if err > 1e-6:
            raise SystemExit(f"the emulated index math misses the reference at {e}x{f}x{d}: relative error {err:.2e}")
    for e, d, f in ((10, 40, 768), (9, 24, 128)):  # down: 12 groups (a partial epilogue); 2
        dw = quantize(torch.randn(e, d, f, generator=g) * f ** -0.5, "q4")
        h = torch.randn(8, f, generator=g)
        slots = torch.randperm(e, generator=g)[:8]
        wts = torch.rand(8, generator=g)
        ref = reference_down(h, slots, wts, dw).double()
        err = float((emulate_down(h, slots, wts, dw) - ref).norm() / ref.norm())
        res[f"down {e}x{d}x{f}"] = err
        if err > 1e-6:
            raise SystemExit(f"the emulated down misses the reference at {e}x{d}x{f}: relative error {err:.2e}")
    return res


def _sass(kernel, sig: dict, cst: dict, warps: int, per_thread: float) -> dict:
    """Static SASS of one program of `kernel` compiled for sm_90 (pointers and strides marked divisible by 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernel_regs import cuobjdump, sass_ops

    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items()) if v.startswith("*")
             or k.startswith("stride")}
    sig = {**sig, **{c: "constexpr" for c in cst}}
    kern = triton.compile(GluonASTSource(kernel, sig, cst, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})
    ops = sass_ops(kern.asm["cubin"])
    total = sum(ops.values())
    usage = cuobjdump(kern.asm["cubin"], "-res-usage")
    regs = next((w for line in usage.splitlines() for w in line.split() if w.startswith("REG")), "")
    return {"instructions": total, "per_input": total / per_thread, "registers": regs,
            "shared_stores": ops.get("STS", 0), "top": dict(ops.most_common(8))}


def sass_counts(d: int = 2048, f: int = 768) -> dict:
    """gate_up ([F, D] gate and up, 16 + 16 rows a program, 4 warps) and down ([D, F], 16 rows, 8 warps) at the
    10.6B shape."""
    gsig = {"x_ptr": "*bf16", "slot_ptr": "*i64", "gq": "*i32", "gs": "*bf16", "gm": "*bf16", "uq": "*i32",
            "us": "*bf16", "um": "*bf16", "h_ptr": "*fp32", "F": "i32", "stride_qs": "i32", "stride_qn": "i32",
            "stride_ss": "i32", "stride_sn": "i32"}
    dsig = {"h_ptr": "*fp32", "slot_ptr": "*i64", "wt_ptr": "*fp32", "dq": "*i32", "ds": "*bf16", "dm": "*bf16",
            "y_ptr": "*fp32", "D": "i32", "stride_qs": "i32", "stride_qn": "i32", "stride_ss": "i32",
            "stride_sn": "i32"}
    return {"gate_up": _sass(KERNEL, gsig, {"KW": d // 8, "NG": d // GROUP, "PAIR": PAIR, **layouts()}, WARPS,
                             2 * ROWS * d / (32 * WARPS)),
            "down": _sass(DOWN, dsig, {"KW": f // 8, "NG": f // GROUP, "PAIR": PAIR, **layouts(8, 16)}, 8,
                          16 * f * 8 / (32 * 8))}


def gpu_run() -> dict:
    """One token's 8 experts at the 10.6B shape (D 2048, F 768, 128 experts): gate_up and down each checked against
    its reference, then timed in a CUDA graph of calls on other slots against TUNED's quant_gate_up / quant_down
    (without PDL, as these kernels; TUNED's down reads h in fp32, this one rounds it to bf16)."""
    from bench_moe_kernels import rel, time_graph

    from tiered.kernels import quant_moe as qm
    from tiered.layout.quant import quantize

    e, f, d = 128, 768, 2048
    g = torch.Generator(device="cuda").manual_seed(0)
    gate = quantize(torch.randn(e, f, d, generator=g, device="cuda") * d ** -0.5, "q4")
    up = quantize(torch.randn(e, f, d, generator=g, device="cuda") * d ** -0.5, "q4")
    x = torch.randn(d, generator=g, device="cuda").to(torch.bfloat16)
    sets = [torch.randperm(e, generator=g, device="cuda")[:8] for _ in range(8)]
    row = {"shape": [e, f, d], "bytes": 2 * 8 * gate.nbytes // e}
    row["rel_err"] = rel(gate_up(x, sets[0], gate, up), reference(x, sets[0], gate, up))
    os.environ["TIERED_PDL"] = "0"
    try:
        row["tuned_nopdl_us"] = time_graph([lambda s=s: qm.quant_gate_up(x[None], s, gate, up) for s in sets],
                                           reps=20) * 1e6
    finally:
        os.environ.pop("TIERED_PDL")
    if row["rel_err"] <= 1e-4:
        row["us"] = time_graph([lambda s=s: gate_up(x, s, gate, up) for s in sets], reps=20) * 1e6
        row["tbps"] = row["bytes"] / row["us"] / 1e6
        row["vs_tuned_nopdl"] = row["tuned_nopdl_us"] / row["us"]
    print("gate_up", json.dumps(row), flush=True)
    dw = quantize(torch.randn(e, d, f, generator=g, device="cuda") * f ** -0.5, "q4")
    h = torch.randn(8, f, generator=g, device="cuda")
    wts = torch.rand(8, generator=g, device="cuda")
    drow = {"shape": [e, d, f], "bytes": 8 * dw.nbytes // e}
    drow["rel_err"] = rel(down(h, sets[0], wts, dw), reference_down(h, sets[0], wts, dw))
    os.environ["TIERED_PDL"] = "0"
    try:
        drow["tuned_nopdl_us"] = time_graph([lambda s=s: qm.quant_down(h, s[None], wts[None], dw, torch.float32)
                                             for s in sets], reps=20) * 1e6
    finally:
        os.environ.pop("TIERED_PDL")
    if drow["rel_err"] <= 1e-4:
        drow["us"] = time_graph([lambda s=s: down(h, s, wts, dw) for s in sets], reps=20) * 1e6
        drow["tbps"] = drow["bytes"] / drow["us"] / 1e6
        drow["vs_tuned_nopdl"] = drow["tuned_nopdl_us"] / drow["us"]
    print("down", json.dumps(drow), flush=True)
    return {"gate_up": row, "down": drow}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="check and time the kernel on this machine's GPU")
    args = ap.parse_args()
    if gluon is None:
        sys.exit(f"this Triton ({getattr(triton, '__version__', 'absent')}) has no Gluon")
    res = {"triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "cpu_check": cpu_check()}
    print("emulated index math against the reference (relative error):", res["cpu_check"])
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        from benchmeta import git_commit, write_out

        res.update(device=torch.cuda.get_device_name(), commit=git_commit(), **gpu_run())
        print(write_out(res, "gluon_q4_experts.json"))
        return
    res["sass"] = sass_counts()
    for name, c in res["sass"].items():
        print(f"{name}: {c['instructions']} SASS, {c['per_input']:.2f} an input, {c['registers']}, "
              f"STS {c['shared_stores']}; {c['top']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
