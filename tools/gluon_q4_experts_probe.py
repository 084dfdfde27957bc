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
G groups a step (1, 2, 4; quant_gluon's K order: a thread's 2G words of a row adjacent, so 8-byte loads at G 1 and
16-byte from G 2) and D steps a load (the next load issued before the current steps are computed): VARIANTS.
gate_up reads gate and up rows from one base pointer (up's codes at 16 uoff words from gate's): session 43's
select between two row pointers, and a select between two offsets as well, hid the words' alignment from the
compiler, which then loaded them 4 bytes at a time (64 LDG.E a thread; now 32 LDG.E.64, or 16 LDG.E.128 from G 2).
down: 8 warps, warp k taking expert k's rows and h[k] (fp32, rounded to bf16 for the tensor cores), its routing
weight applied in its epilogue, the warps' sums added: 16 rows a program, 128 programs of 8 warps at the 10.6B shape.
Offline (sm_90, Triton 3.9): gate_up 1.98 SASS an input with the epilogue and silu (62 registers; 1.94 and 76-78
from G 2), down 2.67 (55 registers; h's conversion to bf16 included; 2.62-2.67 and 78-100 from G 2). The index math of both is emulated in torch against the
dequantized reference on CPU; the kernels themselves are checked only by --gpu.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
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
VARIANTS = ((1, 1), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2))  # (groups a step, steps a load)


def layouts(warps: int = WARPS, rows: int = 2 * ROWS, groups: int = 1, ahead: int = 1) -> dict:
    """The layouts of a program of `rows` rows (16 or 32) whose `warps` warps each take a K slice: the operands are
    [warps, rows, 64 G] with the warps on the batch dimension (see the docstring); `groups` G groups a step (1, 2,
    4: a thread's 2G words of a row adjacent, 16-byte loads from G 2) and `ahead` steps a load (1, 2, 4)."""
    if warps not in (4, 8) or rows not in (16, 32) or groups not in (1, 2, 4) or ahead not in (1, 2, 4):
        raise ValueError(f"warps 4 or 8, rows 16 or 32, groups and ahead 1, 2 or 4; got {warps}, {rows}, {groups}, "
                         f"{ahead}")
    wb = [[1 << i] for i in range(warps.bit_length() - 1)]  # the batch (K slice) bits on the warps
    hs = range(groups.bit_length())  # the bits of h: a thread's word of a row in a step (2G of them)

    def pad(v, n):  # a basis vector of rank n: v's entries first
        return v + [0] * (n - len(v))

    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1, 1], instr_shape=[1, 16, 8])
    r16 = [[0, 16]] if rows == 32 else []
    # words [W (b), R (row), 4 (t), 2G (h), D (step of the load)]: word 2G t + h of a step's 8G
    w0 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1 << i, 0] for i in hs] + [[0, 8, 0, 0, 0]]
                                    + [pad(v, 5) for v in r16] + [[0, 0, 0, 0, 1 << i]
                                                                  for i in range(ahead.bit_length() - 1)],
                                    lane_bases=[[0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0],
                                                [0, 4, 0, 0, 0]],
                                    warp_bases=[pad(v, 5) for v in wb], block_bases=[],
                                    shape=[warps, rows, 4, 2 * groups, ahead])
    # [W, R, 2G (h), 4 (t), 8 (l)] -> [W, R, 64 G] with k = 32 h + 8 t + l: A's layout
    l5 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, 0, 0, 0, 4], [0, 8, 0, 0, 0]]
                                    + [[0, 0, 1 << i, 0, 0] for i in hs] + [pad(v, 5) for v in r16],
                                    lane_bases=[[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 1, 0, 0, 0], [0, 2, 0, 0, 0],
                                                [0, 4, 0, 0, 0]],
                                    warp_bases=[pad(v, 5) for v in wb], block_bases=[],
                                    shape=[warps, rows, 2 * groups, 4, 8])
    # x of a step [W (b), 2G (h), 4 (t), 8 (j), 8 (n)], stored order j
    xb5 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 4, 0]]
                                     + [[0, 1 << i, 0, 0, 0] for i in hs],
                                     lane_bases=[[0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 2],
                                                 [0, 0, 0, 0, 4]],
                                     warp_bases=[pad(v, 5) for v in wb], block_bases=[],
                                     shape=[warps, 2 * groups, 4, 8, 8])
    xg = gl.BlockedLayout(size_per_thread=[1, 1, 8], threads_per_warp=[1, 4, 8], warps_per_cta=[warps, 1, 1],
                          order=[2, 1, 0])
    return dict(MMA=mma, A_L=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8),
                B_L=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8), W0_L=w0, L5=l5, XB_L=xb5, XG_L=xg)


def _steps_fn(cur, W: gl.constexpr, R: gl.constexpr, G: gl.constexpr, D: gl.constexpr):
    """A load's words [W, R, 4 (t), 2G (h), D] as the tuple of its D steps' [W, R, 4, 2G] (step 2a + b at [.., a, b])."""
    if D == 1:
        return (gl.reshape(cur, [W, R, 4, 2 * G]),)
    elif D == 2:
        return gl.split(cur)
    else:
        ev, od = gl.split(gl.reshape(cur, [W, R, 4, 2 * G, 2, 2]))
        w0, w2 = gl.split(ev)
        w1, w3 = gl.split(od)
        return (w0, w1, w2, w3)


def _word_ptrs_fn(rbase, bstride, W: gl.constexpr, R: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
                  W0_L: gl.constexpr):
    """Pointers [W, R, 4 (t), 2G (h), D] of a load's words: rbase [W, R] (rows' first words), warp b's K slice
    from word b * bstride; step d's word 2G t + h at 8G d + 2G t + h."""
    W4: gl.constexpr = gl.SliceLayout(4, W0_L)
    W3: gl.constexpr = gl.SliceLayout(3, W4)
    b_w = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, W3)))
    t_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, W3)))
    h_w = gl.arange(0, 2 * G, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, W4))))
    d_w = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, W0_L)))))
    col4 = (b_w[:, None, None] * bstride + 2 * G * t_w[None, None, :])[:, :, :, None] + h_w[None, None, None, :]
    col = col4[:, :, :, :, None] + 8 * G * d_w[None, None, None, None, :]  # [W, 1, 4, 2G, D]
    return rbase[:, :, None, None, None] + col


def _x_offsets_fn(bstride, W: gl.constexpr, G: gl.constexpr, XB_L: gl.constexpr):
    """x's offsets [W, 2G (h), 4 (t), 8 (j), 8 (n)] within a step (warp b's slice from input b * bstride; the
    stored word 2G t + h, input j of it) and each one's group within the step, broadcast over n."""
    X4: gl.constexpr = gl.SliceLayout(4, XB_L)
    b_x = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    h_x = gl.arange(0, 2 * G, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, X4))))
    t_x = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, X4))))
    j_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, X4))))
    n_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, XB_L)))))
    xw = 2 * G * t_x[None, None, :] + h_x[None, :, None]  # [1, 2G, 4]: the stored word of (h, t)
    xo3 = (b_x[:, None, None] * bstride + 8 * xw)[:, :, :, None] + j_x[None, None, None, :]  # [W, 2G, 4, 8]
    xoff, n5 = gl.broadcast(xo3[:, :, :, :, None], n_x[None, None, None, None, :])
    g5 = gl.broadcast(xoff, (xw // 8)[:, :, :, None, None])[1]  # the group (0 .. G - 1) within the step
    return xoff, n5, g5


def _mma_step_fn(w, xv, acc, sh, W: gl.constexpr, R: gl.constexpr, G: gl.constexpr, PAIR: gl.constexpr,
                 A_L: gl.constexpr, B_L: gl.constexpr, L5: gl.constexpr):
    """One step: words w [W, R, 4, 2G] as A (the pairs' bf16 128 + c), x of the step xv [W, 2G, 4, 8 (j), 8 (n)]
    (stored order, zero outside each group's column) as B, acc += A B."""
    w = gl.convert_layout(gl.permute(w, [0, 1, 3, 2]), gl.SliceLayout(4, L5), assert_trivial=True)
    w5, s5 = gl.broadcast(w[:, :, :, :, None], sh)
    cb = gl.inline_asm_elementwise(PAIR, "=r,r,r,r,r", [w5, s5], dtype=gl.bfloat16, is_pure=True, pack=2)
    a = gl.convert_layout(gl.reshape(cb, [W, R, 64 * G]), A_L, assert_trivial=True)
    xv = gl.reshape(gl.permute(gl.reshape(xv, [W, 2 * G, 4, 2, 4, 8]), [0, 1, 2, 4, 3, 5]), [W, 64 * G, 8])  # j -> l
    return mma_v2(a, gl.convert_layout(xv, B_L, assert_trivial=True), acc)


def _gate_up_kernel(x_ptr, slot_ptr, gq, gs, gm, uoff, us, um, h_ptr, F, stride_qs, stride_qn, stride_ss, stride_sn,
                    KW: gl.constexpr, NG: gl.constexpr, G: gl.constexpr, D: gl.constexpr, PAIR: gl.constexpr,
                    MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, W0_L: gl.constexpr, L5: gl.constexpr,
                    XB_L: gl.constexpr, XG_L: gl.constexpr):
    """Program (fb, k): h[k, fb*16 .. +16] = silu(x . gate) * (x . up) of the token's k-th expert (slot_ptr[k]);
    G groups a step, D steps a load (the next load issued before the current steps are computed)."""
    fb = gl.program_id(0)
    kk = gl.program_id(1)
    slot = gl.load(slot_ptr + kk)
    GPW: gl.constexpr = NG // 4  # groups a warp
    STEPS: gl.constexpr = GPW // G
    SUP: gl.constexpr = STEPS // D
    W3: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, W0_L))
    r_w = gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(2, W3)))
    f_w = fb * 16 + r_w % 16
    fw = gl.where(f_w < F, f_w, 0).to(gl.int64)
    row_off = slot * stride_qs + fw * stride_qn  # [32]
    # gate rows, then up rows (16 uoff: up's codes from gate's, in words), one base pointer and no select: a select
    # (of pointers or of offsets) hides the words' alignment from the compiler (4-byte loads instead of 8 or 16)
    rbase = gq + (row_off + (r_w // 16) * (uoff * 16))  # [32]
    wptr = _word_ptrs(rbase[None, :], GPW * 8, 4, 32, G, D, W0_L)  # [4, 32, 4, 2G, D]
    l_s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    sh = (4 * (l_s // 2))[None, None, None, None, :]
    xoff, n5, g5 = _x_offsets(GPW * 64, 4, G, XB_L)
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
    cur = gl.load(wptr)
    for j in gl.static_range(SUP):
        if j + 1 < SUP:
            nxt = gl.load(wptr + (j + 1) * 8 * G * D)
        parts = _steps(cur, 4, 32, G, D)
        for d in gl.static_range(D):
            st = D * j + d  # each warp's st-th step: its groups G st .. G st + G - 1
            xv = gl.load(x_ptr + st * 64 * G + xoff, mask=n5 == (G * st + g5) % 8, other=0.0)
            acc = _mma_step(parts[d], xv, acc, sh, 4, 32, G, PAIR, A_L, B_L, L5)
            if ((st + 1) * G % 8 == 0) or (st == STEPS - 1):
                e8 = (st * G // 8) * 8
                g = b_c[:, None] * GPW + e8 + n_c[None, :]  # [4, 8] each warp's groups
                gk = (g[:, None, :]).to(gl.int64)
                ok = (((e8 + n_c) < GPW)[None, :])[:, None, :]
                sv = gl.load(sbase[None, :, None] + gk, mask=ok, other=0.0).to(gl.float32)  # [4, 32, 8]
                mv = gl.load(mbase[None, :, None] + gk, mask=ok, other=0.0).to(gl.float32)
                gx = b_g[:, None] * GPW + e8 + n_g[None, :]  # [4, 8]
                okx = (e8 + n_g[None, :]) < GPW
                xx = gl.load(x_ptr + gx[:, :, None] * 64 + i_g[None, None, :], mask=okx[:, :, None], other=0.0)
                xs = gl.convert_layout(gl.sum(xx.to(gl.float32), axis=2), gl.SliceLayout(1, MMA))  # [4, 8]
                tot += gl.sum(sv * (acc - 128.0 * xs[:, None, :]) + mv * xs[:, None, :], axis=2)
                acc = gl.zeros([4, 32, 8], gl.float32, layout=MMA)
        if j + 1 < SUP:
            cur = nxt
    both = gl.sum(tot, axis=0)  # [32]: the warps' K slices added; rows 0-15 gate, 16-31 up
    gate, up = gl.split(gl.permute(gl.reshape(both, [2, 16]), [1, 0]))
    hv = gate / (1.0 + gl.exp(-gate)) * up
    f_o = fb * 16 + gl.arange(0, 16, layout=hv.type.layout)
    gl.store(h_ptr + kk * F + f_o, hv, mask=f_o < F)


def _down_kernel(h_ptr, slot_ptr, wt_ptr, dq, ds, dm, y_ptr, D_OUT, stride_qs, stride_qn, stride_ss, stride_sn,
                 KW: gl.constexpr, NG: gl.constexpr, G: gl.constexpr, D: gl.constexpr, PAIR: gl.constexpr,
                 MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, W0_L: gl.constexpr, L5: gl.constexpr,
                 XB_L: gl.constexpr, XG_L: gl.constexpr):
    """Program db: y[db*16 .. +16] = sum_k wt[k] (down_k . h[k]); warp k takes expert k (slot_ptr[k]) and h[k] (fp32,
    rounded to bf16 for the tensor cores); the warps' sums meet at the end. G groups a step, D steps a load."""
    db = gl.program_id(0)
    STEPS: gl.constexpr = NG // G
    SUP: gl.constexpr = STEPS // D
    W3: gl.constexpr = gl.SliceLayout(3, gl.SliceLayout(4, W0_L))
    b_w = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, W3)))
    r_w = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, W3)))
    slot_w = gl.load(slot_ptr + b_w)  # [8] each warp's expert
    d_w = db * 16 + r_w
    dw = gl.where(d_w < D_OUT, d_w, 0).to(gl.int64)
    rbase = dq + slot_w[:, None] * stride_qs + dw[None, :] * stride_qn  # [8, 16] row pointers
    wptr = _word_ptrs(rbase, 0, 8, 16, G, D, W0_L)  # [8, 16, 4, 2G, D]
    l_s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    sh = (4 * (l_s // 2))[None, None, None, None, :]
    xoff, n5, g5 = _x_offsets(KW * 8, 8, G, XB_L)  # h[k] at its inputs
    C2: gl.constexpr = gl.SliceLayout(2, MMA)
    b_c = gl.arange(0, 8, layout=gl.SliceLayout(1, C2))
    r_c = gl.arange(0, 16, layout=gl.SliceLayout(0, C2))
    slot_c = gl.load(slot_ptr + b_c)
    d_c = db * 16 + r_c
    dc = gl.where(d_c < D_OUT, d_c, 0).to(gl.int64)
    srow = slot_c[:, None] * stride_ss + dc[None, :] * stride_sn  # [8, 16]
    n_c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    XG2: gl.constexpr = gl.SliceLayout(2, XG_L)
    b_g = gl.arange(0, 8, layout=gl.SliceLayout(1, XG2))
    n_g = gl.arange(0, 8, layout=gl.SliceLayout(0, XG2))
    i_g = gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, XG_L)))
    tot = gl.zeros([8, 16], gl.float32, layout=C2)
    acc = gl.zeros([8, 16, 8], gl.float32, layout=MMA)
    cur = gl.load(wptr)
    for j in gl.static_range(SUP):
        if j + 1 < SUP:
            nxt = gl.load(wptr + (j + 1) * 8 * G * D)
        parts = _steps(cur, 8, 16, G, D)
        for d in gl.static_range(D):
            st = D * j + d
            xv = gl.load(h_ptr + st * 64 * G + xoff, mask=n5 == (G * st + g5) % 8, other=0.0).to(gl.bfloat16)
            acc = _mma_step(parts[d], xv, acc, sh, 8, 16, G, PAIR, A_L, B_L, L5)
            if ((st + 1) * G % 8 == 0) or (st == STEPS - 1):
                e8 = (st * G // 8) * 8
                gn = e8 + n_c  # [8] the groups of these columns
                ok = ((gn < NG)[None, :])[:, None, :]
                gk = (gn[None, :])[:, None, :].to(gl.int64)
                sv = gl.load(ds + srow[:, :, None] + gk, mask=ok, other=0.0).to(gl.float32)  # [8, 16, 8]
                mv = gl.load(dm + srow[:, :, None] + gk, mask=ok, other=0.0).to(gl.float32)
                gx = e8 + n_g
                okx = (gx < NG)[None, :]
                hx = gl.load(h_ptr + b_g[:, None, None] * (KW * 8) + gx[None, :, None] * 64 + i_g[None, None, :],
                             mask=okx[:, :, None], other=0.0)
                xs = gl.convert_layout(gl.sum(hx.to(gl.bfloat16).to(gl.float32), axis=2), gl.SliceLayout(1, MMA))
                tot += gl.sum(sv * (acc - 128.0 * xs[:, None, :]) + mv * xs[:, None, :], axis=2)
                acc = gl.zeros([8, 16, 8], gl.float32, layout=MMA)
        if j + 1 < SUP:
            cur = nxt
    wt = gl.load(wt_ptr + b_c)  # [8] routing weights
    y = gl.sum(tot * wt[:, None], axis=0)  # [16]
    d_o = db * 16 + gl.arange(0, 16, layout=y.type.layout)
    gl.store(y_ptr + d_o, y, mask=d_o < D_OUT)


KERNEL = DOWN = _steps = _word_ptrs = _x_offsets = _mma_step = None
if gluon is not None:
    _steps = gluon.jit(_steps_fn)
    _word_ptrs = gluon.jit(_word_ptrs_fn)
    _x_offsets = gluon.jit(_x_offsets_fn)
    _mma_step = gluon.jit(_mma_step_fn)
    KERNEL = gluon.jit(_gate_up_kernel)
    DOWN = gluon.jit(_down_kernel)


def _check(x, gate, up) -> None:
    e, d = gate.q.shape[0], gate.matrix[1]
    if gate.fmt != "q4" or gate.group != GROUP or d % (WARPS * GROUP) or up.matrix != gate.matrix:
        raise ValueError(f"the probe takes q4 gate/up stacks with groups of {GROUP} and D a multiple of "
                         f"{WARPS * GROUP}; got {gate.fmt}, group {gate.group}, {e} x {tuple(gate.matrix)}")


def fit(steps_of: int, groups: int, ahead: int) -> tuple[int, int]:
    """(G, D) that divide: G groups a step of `steps_of` groups a warp, D steps a load of its steps (halved until
    they do)."""
    while steps_of % groups:
        groups //= 2
    while (steps_of // groups) % ahead:
        ahead //= 2
    return groups, ahead


def gate_up(x, slots, gate, up, groups: int = 1, ahead: int = 1):
    """x [D] bf16, slots [K] int64 (CUDA), gate/up q4 stacks [E, F, D] -> h [K, F] fp32 (silu(gate) * up); `groups`
    groups a step, `ahead` steps a load (fewer where they do not divide a warp's groups)."""
    from tiered.kernels import quant_moe as qm

    _check(x, gate, up)
    f, d = gate.matrix
    gq, uq = qm._codes(gate, 2), qm._codes(up, 2)
    h = torch.empty(slots.numel(), f, dtype=torch.float32, device=x.device)
    G, D = fit(d // GROUP // WARPS, groups, ahead)
    uoff = (uq.data_ptr() - gq.data_ptr()) // 64  # up's codes from gate's, in 16-word units
    if uoff * 64 != uq.data_ptr() - gq.data_ptr() or gq.stride() != uq.stride():
        raise ValueError("gate and up codes need the same strides and 64-byte aligned storage")
    KERNEL[(triton.cdiv(f, ROWS), slots.numel())](x, slots, gq, gate.scale, gate.min, uoff, up.scale, up.min, h, f,
                                                  gq.stride(0), gq.stride(1), gate.scale.stride(0),
                                                  gate.scale.stride(1), KW=d // 8, NG=d // GROUP, G=G, D=D,
                                                  PAIR=PAIR, **layouts(groups=G, ahead=D), num_warps=WARPS)
    return h


def emulate(x, slots, gate, up, groups: int = 1):
    """The kernel's logical computation in torch (CPU): each warp's K quarter through quant_gluon.emulate (the same
    word, nibble and x indices, `groups` groups a step, the 8-group epilogue with its 128 offset), the warps' sum,
    silu(gate) * up. fp64."""
    f, d = gate.matrix
    gpw = d // GROUP // WARPS
    groups = fit(gpw, groups, 1)[0]
    out = []
    for s in slots.tolist():
        gate_row, up_row = (sum(emulate_rows(x, w[s], b * gpw, gpw, groups) for b in range(WARPS))
                            for w in (gate, up))
        out.append(torch.nn.functional.silu(gate_row) * up_row)
    return torch.stack(out)


def reference(x, slots, gate, up):
    """silu(x . gate_k) * (x . up_k) with the dequantized rows (fp32), [K, F]."""
    xf = x.float()
    return torch.stack([torch.nn.functional.silu(gate[s].dequantize(torch.float32) @ xf)
                        * (up[s].dequantize(torch.float32) @ xf) for s in slots.tolist()])


def down(h, slots, wts, dw, groups: int = 1, ahead: int = 1):
    """h [8, F] fp32, slots [8] int64, wts [8] fp32 (CUDA), dw q4 stack [E, D, F] -> y [D] fp32 = sum_k wts[k]
    (dw[slots[k]] . h[k]) with h rounded to bf16."""
    from tiered.kernels import quant_moe as qm

    d, f = dw.matrix
    if dw.fmt != "q4" or dw.group != GROUP or f % GROUP or slots.numel() != 8:
        raise ValueError(f"the down probe takes a q4 stack with groups of {GROUP}, F a multiple of it and 8 experts; "
                         f"got {dw.fmt}, group {dw.group}, {tuple(dw.matrix)}, {slots.numel()} experts")
    q = qm._codes(dw, 2)
    y = torch.empty(d, dtype=torch.float32, device=h.device)
    G, D = fit(f // GROUP, groups, ahead)
    DOWN[(triton.cdiv(d, 16),)](h, slots, wts, q, dw.scale, dw.min, y, d, q.stride(0), q.stride(1),
                                dw.scale.stride(0), dw.scale.stride(1), KW=f // 8, NG=f // GROUP, G=G, D=D, PAIR=PAIR,
                                **layouts(8, 16, G, D), num_warps=8)
    return y


def emulate_down(h, slots, wts, dw, groups: int = 1):
    """The down kernel's logical computation in torch (CPU), fp64: warp k's expert through quant_gluon.emulate (the
    same words, nibbles and h offsets, h rounded to bf16, the 8-group epilogue), the routing weight, the warps'
    sum."""
    groups = fit(dw.matrix[1] // GROUP, groups, 1)[0]
    return sum(float(wts[b]) * emulate_rows(h[b].to(torch.bfloat16), dw[s], groups=groups)
               for b, s in enumerate(slots.tolist()))


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
        for gr in (1, 2, 4):
            err = float((emulate(x, slots, gate, up, gr) - ref).norm() / ref.norm())
            res[f"{e}x{f}x{d}" + (f" G{gr}" if gr > 1 else "")] = err
            if err > 1e-6:
                raise SystemExit(f"the emulated index math misses the reference at {e}x{f}x{d}, {gr} groups a step: "
                                 f"relative error {err:.2e}")
    for e, d, f in ((10, 40, 768), (9, 24, 128)):  # down: 12 groups (a partial epilogue); 2
        dw = quantize(torch.randn(e, d, f, generator=g) * f ** -0.5, "q4")
        h = torch.randn(8, f, generator=g)
        slots = torch.randperm(e, generator=g)[:8]
        wts = torch.rand(8, generator=g)
        ref = reference_down(h, slots, wts, dw).double()
        for gr in (1, 2, 4):
            err = float((emulate_down(h, slots, wts, dw, gr) - ref).norm() / ref.norm())
            res[f"down {e}x{d}x{f}" + (f" G{gr}" if gr > 1 else "")] = err
            if err > 1e-6:
                raise SystemExit(f"the emulated down misses the reference at {e}x{d}x{f}, {gr} groups a step: "
                                 f"relative error {err:.2e}")
    return res


def _sass(kernel, sig: dict, cst: dict, warps: int, per_thread: float) -> dict:
    """Static SASS of one program of `kernel` compiled for sm_90 (pointers and strides marked divisible by 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernel_regs import cuobjdump, sass_ops

    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items()) if v.startswith("*")
             or k.startswith("stride") or k == "uoff"}
    sig = {**sig, **{c: "constexpr" for c in cst}}
    kern = triton.compile(GluonASTSource(kernel, sig, cst, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})
    ops = sass_ops(kern.asm["cubin"])
    loads = collections.Counter(re.findall(r"\bLDG\.[\w.]+", cuobjdump(kern.asm["cubin"], "-sass")))
    total = sum(ops.values())
    usage = cuobjdump(kern.asm["cubin"], "-res-usage")
    regs = next((w for line in usage.splitlines() for w in line.split() if w.startswith("REG")), "")
    return {"instructions": total, "per_input": total / per_thread, "registers": regs,
            "shared_stores": ops.get("STS", 0), "loads": dict(loads), "top": dict(ops.most_common(8))}


def sass_counts(d: int = 2048, f: int = 768) -> dict:
    """gate_up ([F, D] gate and up, 16 + 16 rows a program, 4 warps) and down ([D, F], 16 rows, 8 warps) at the
    10.6B shape."""
    gsig = {"x_ptr": "*bf16", "slot_ptr": "*i64", "gq": "*i32", "gs": "*bf16", "gm": "*bf16", "uoff": "i64",
            "us": "*bf16", "um": "*bf16", "h_ptr": "*fp32", "F": "i32", "stride_qs": "i32", "stride_qn": "i32",
            "stride_ss": "i32", "stride_sn": "i32"}
    dsig = {"h_ptr": "*fp32", "slot_ptr": "*i64", "wt_ptr": "*fp32", "dq": "*i32", "ds": "*bf16", "dm": "*bf16",
            "y_ptr": "*fp32", "D": "i32", "stride_qs": "i32", "stride_qn": "i32", "stride_ss": "i32",
            "stride_sn": "i32"}
    dsig["D_OUT"] = dsig.pop("D")
    dsig = {k: dsig[k] for k in ("h_ptr", "slot_ptr", "wt_ptr", "dq", "ds", "dm", "y_ptr", "D_OUT", "stride_qs",
                                 "stride_qn", "stride_ss", "stride_sn")}
    out = {}
    for gr, ah in VARIANTS:
        tag = "" if (gr, ah) == (1, 1) else f" G{gr} D{ah}"
        G, D = fit(d // GROUP // WARPS, gr, ah)
        if (G, D) == (gr, ah):
            out["gate_up" + tag] = _sass(KERNEL, gsig, {"KW": d // 8, "NG": d // GROUP, "G": G, "D": D, "PAIR": PAIR,
                                                        **layouts(groups=G, ahead=D)}, WARPS,
                                         2 * ROWS * d / (32 * WARPS))
        G, D = fit(f // GROUP, gr, ah)
        if (G, D) == (gr, ah):
            out["down" + tag] = _sass(DOWN, dsig, {"KW": f // 8, "NG": f // GROUP, "G": G, "D": D, "PAIR": PAIR,
                                                   **layouts(8, 16, G, D)}, 8, 16 * f * 8 / (32 * 8))
    return out


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
    os.environ["TIERED_PDL"] = "0"
    try:
        row["tuned_nopdl_us"] = time_graph([lambda s=s: qm.quant_gate_up(x[None], s, gate, up) for s in sets],
                                           reps=20) * 1e6
    finally:
        os.environ.pop("TIERED_PDL")
    ref = reference(x, sets[0], gate, up)
    for gr, ah in VARIANTS:
        v = row[f"G{gr}_D{ah}"] = {"rel_err": rel(gate_up(x, sets[0], gate, up, gr, ah), ref)}
        if v["rel_err"] <= 1e-4:
            v["us"] = time_graph([lambda s=s: gate_up(x, s, gate, up, gr, ah) for s in sets], reps=20) * 1e6
            v["tbps"] = row["bytes"] / v["us"] / 1e6
            v["vs_tuned_nopdl"] = row["tuned_nopdl_us"] / v["us"]
    print("gate_up", json.dumps(row), flush=True)
    dw = quantize(torch.randn(e, d, f, generator=g, device="cuda") * f ** -0.5, "q4")
    h = torch.randn(8, f, generator=g, device="cuda")
    wts = torch.rand(8, generator=g, device="cuda")
    drow = {"shape": [e, d, f], "bytes": 8 * dw.nbytes // e}
    os.environ["TIERED_PDL"] = "0"
    try:
        drow["tuned_nopdl_us"] = time_graph([lambda s=s: qm.quant_down(h, s[None], wts[None], dw, torch.float32)
                                             for s in sets], reps=20) * 1e6
    finally:
        os.environ.pop("TIERED_PDL")
    ref = reference_down(h, sets[0], wts, dw)
    for gr, ah in VARIANTS:
        if fit(f // GROUP, gr, ah) != (gr, ah):
            continue
        v = drow[f"G{gr}_D{ah}"] = {"rel_err": rel(down(h, sets[0], wts, dw, gr, ah), ref)}
        if v["rel_err"] <= 1e-4:
            v["us"] = time_graph([lambda s=s: down(h, s, wts, dw, gr, ah) for s in sets], reps=20) * 1e6
            v["tbps"] = drow["bytes"] / v["us"] / 1e6
            v["vs_tuned_nopdl"] = drow["tuned_nopdl_us"] / v["us"]
    print("down", json.dumps(drow), flush=True)
    for name, r in (("gate_up", row), ("down", drow)):
        print(f"{name}: TUNED {r['tuned_nopdl_us']:.2f} us; " + ", ".join(
            f"{k} {v.get('us', float('nan')):.2f} (err {v['rel_err']:.1e})" for k, v in r.items()
            if isinstance(v, dict)), flush=True)
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
