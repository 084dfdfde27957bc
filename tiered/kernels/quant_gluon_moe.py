"""One token's experts in q4 on tensor cores, written in Gluon: QConfig.algo 3 of the expert kernels (gate_up and
down of quant_moe.experts_quant_decode), with K split across a program's warps.

Owns: the two kernels, their layouts (`layouts`), launchers (`gate_up`, `down`), where they serve (`gate_up_ok`,
`down_ok`) and `emulate_gate_up` / `emulate_down`, the kernels' index math in torch (Gluon has no interpreter: the CPU
tests check that, the GPU tests the kernels). Does not own: the quantized layout (tiered.layout.quant), the choice
of tiles (quant_moe.TUNED / TIERED_QCONFIG), PDL's switches (pdl.py), the word-tile kernels that serve everything
else (quant_moe).

The products are quant_gluon's (read that module's docstring first): a thread's stored words are its own mma.sync
fragment, a code pair becomes bf16x2 (128 + c) with one shift and one lop3, x sits block-diagonally in B so that one
mma gives each row's dot with 8 groups, and every 8 groups the scales and minima apply. What differs is the work
split, since an expert's 768 rows in blocks of 64 stacked over 4 warps would leave too few programs:
- gate_up: the 4 warps of a program take the same 32 rows (16 gate rows and the 16 up rows of the same FFN index)
  and each its own quarter of K. The operands are batched, [4 (warp), rows, 64 G]; mma_v2 runs each warp's K slice as
  one batch element, and one cross-warp sum ends the program. The accumulator's row-16 basis puts a gate row and its
  up row in one thread, so h = silu(gate) * up is taken there and stored (in input order or word-major, QConfig.hw).
  Gate and up rows are read from one base pointer (up's codes 16 uoff words from gate's): a select between two row
  pointers (or two offsets) hides the words' alignment from the compiler, which then loads them 4 bytes at a time.
  Programs: (F / 16 row blocks) x (K experts); D a multiple of 4 x 64 G.
- down: 8 warps, warp k taking expert k's rows and h[k] (fp32, rounded to bf16 for the tensor cores: the reference
  rounds h to the compute dtype too), its routing weight applied in its epilogue: 16 rows a program, D / 16
  programs, K = 8 experts a token exactly.
G groups a step (1, 2, 4: a thread's 2G words of a row adjacent, so 8-byte loads at G 1 and 16-byte from G 2) and
D steps a load (the next load issued before the current steps are computed); `fit` lowers them where they do not
divide a warp's groups. PDL: gate_up waits first (the kernel right before it writes the slots); down loads the
slots, the routing weights and its first codes before its wait (written two or more kernels back, pdl.py) and h
after it.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from tiered.kernels.quant_gluon import GROUP, PAIR, gl, gluon, mma_v2, tl_cuda
from tiered.layout.quant import QuantWeight

ROWS = 16  # FFN rows a gate_up program: 16 gate + 16 up
WARPS = 4  # gate_up's K slices
DOWN_EXPERTS = 8  # down's warps: one expert each


def available() -> bool:
    """Whether this Triton has Gluon (3.5+)."""
    return gluon is not None


def fit(groups_of: int, groups: int, ahead: int) -> tuple[int, int]:
    """(G, D) that divide: G groups a step of a warp's `groups_of` groups, D steps a load of its steps (each halved
    until it does)."""
    while groups_of % groups:
        groups //= 2
    while (groups_of // groups) % ahead:
        ahead //= 2
    return groups, ahead


def _stack_ok(w: QuantWeight) -> bool:
    """A q4 stack [E, N, K] in groups of 64 whose codes, scales and minima are rows read as int32 words."""
    q = w.q
    return (w.fmt == "q4" and w.group == GROUP and len(w.lead) == 1 and w.matrix[1] % GROUP == 0
            and q.stride(-1) == 1 and q.stride(-2) % 16 == 0 and q.stride(0) % 16 == 0 and q.data_ptr() % 64 == 0
            and w.scale.stride(-1) == 1 and w.min is not None and w.min.stride(-1) == 1)


def _cuda_ok(x: Tensor) -> bool:
    return (available() and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 8)


def gate_up_ok(x: Tensor, gate: QuantWeight, up: QuantWeight) -> bool:
    """Whether `gate_up` serves one token x [1, D] (bf16, CUDA, mma.sync v2) over q4 stacks gate/up [E, F, D] in
    groups of 64 with D a multiple of 4 x 64, gate and up sharing their strides."""
    if not (_cuda_ok(x) and x.dtype == torch.bfloat16 and x.shape[0] == 1 and x.stride(-1) == 1):
        return False
    if not (_stack_ok(gate) and _stack_ok(up) and gate.q.stride() == up.q.stride()):
        return False
    if gate.scale.stride() != up.scale.stride() or gate.min.stride() != up.min.stride():
        return False
    return gate.matrix == up.matrix and gate.matrix[1] % (WARPS * GROUP) == 0 and (
        up.q.data_ptr() - gate.q.data_ptr()) % 64 == 0


def down_serves(device: torch.device, k: int, down: QuantWeight) -> bool:
    """Whether `down` serves k experts a token on `device` over this stack: CUDA with mma.sync v2, k = 8, a q4
    stack [E, D, F] in groups of 64 (h then comes as fp32 rows in input order: down_ok)."""
    return (available() and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
            and k == DOWN_EXPERTS and _stack_ok(down))


def down_ok(h: Tensor, slots: Tensor, down: QuantWeight) -> bool:
    """Whether `down` serves one token's 8 experts: h [8, F] fp32 rows in input order on CUDA, a q4 stack [E, D, F]
    in groups of 64."""
    return (down_serves(h.device, slots.numel(), down) and h.dtype == torch.float32 and h.is_contiguous()
            and h.shape == (DOWN_EXPERTS, down.matrix[1]))


@functools.lru_cache(maxsize=64)
def layouts(warps: int = WARPS, rows: int = 2 * ROWS, groups: int = 1, ahead: int = 1) -> dict:
    """The layouts of a program of `rows` rows (16 or 32) whose `warps` warps each take a K slice: the operands are
    [warps, rows, 64 G] with the warps on the batch dimension (see the docstring); `groups` G groups a step (1, 2,
    4: a thread's 2G words of a row adjacent, 16-byte loads from G 2) and `ahead` steps a load (1, 2, 4; 0: one, the
    words [W, R, 4, 2G] with no step dimension). Cached: callers spread the dict, never change it."""
    if warps not in (4, 8) or rows not in (16, 32) or groups not in (1, 2, 4) or ahead not in (0, 1, 2, 4):
        raise ValueError(f"warps 4 or 8, rows 16 or 32, groups 1, 2 or 4 and ahead 0, 1, 2 or 4; got {warps}, "
                         f"{rows}, {groups}, {ahead}")
    wb = [[1 << i] for i in range(warps.bit_length() - 1)]  # the batch (K slice) bits on the warps
    hs = range(groups.bit_length())  # the bits of h: a thread's word of a row in a step (2G of them)

    def pad(v, n):  # a basis vector of rank n: v's entries first
        return v + [0] * (n - len(v))

    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1, 1], instr_shape=[1, 16, 8])
    r16 = [[0, 16]] if rows == 32 else []
    lanes = [[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0], [0, 4, 0]]  # t, then rows 1, 2, 4
    if ahead:  # words [W (b), R (row), 4 (t), 2G (h), D (step of the load)]: word 2G t + h of a step's 8G
        w0 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1 << i, 0] for i in hs] + [[0, 8, 0, 0, 0]]
                                        + [pad(v, 5) for v in r16]
                                        + [[0, 0, 0, 0, 1 << i] for i in range(ahead.bit_length() - 1)],
                                        lane_bases=[pad(v, 5) for v in lanes], warp_bases=[pad(v, 5) for v in wb],
                                        block_bases=[], shape=[warps, rows, 4, 2 * groups, ahead])
    else:  # one step a load and no step dimension (the down kernel: see _down_fn)
        w0 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1 << i] for i in hs] + [[0, 8, 0, 0]]
                                        + [pad(v, 4) for v in r16],
                                        lane_bases=[pad(v, 4) for v in lanes], warp_bases=[pad(v, 4) for v in wb],
                                        block_bases=[], shape=[warps, rows, 4, 2 * groups])
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
    """A load's words [W, R, 4 (t), 2G (h), D] as the tuple of its D steps' [W, R, 4, 2G] (step 2a + b at
    [.., a, b])."""
    if D == 1:
        return (gl.reshape(cur, [W, R, 4, 2 * G]),)
    elif D == 2:
        return gl.split(cur)
    else:
        ev, od = gl.split(gl.reshape(cur, [W, R, 4, 2 * G, 2, 2]))
        w0, w2 = gl.split(ev)
        w1, w3 = gl.split(od)
        return (w0, w1, w2, w3)


def _word_ptrs_fn(rbase, bstride: gl.constexpr, W: gl.constexpr, R: gl.constexpr, G: gl.constexpr, D: gl.constexpr,
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


def _gate_up_fn(x_ptr, slot_ptr, slot_base, gq, uoff, gs, us, gm, um, h_ptr, F, stride_qs, stride_qn, stride_ss,
                stride_sn, stride_ms, stride_mn, KW: gl.constexpr, NG: gl.constexpr, G: gl.constexpr,
                D: gl.constexpr, HW: gl.constexpr, GDC: gl.constexpr, PAIR: gl.constexpr, MMA: gl.constexpr,
                A_L: gl.constexpr, B_L: gl.constexpr, W0_L: gl.constexpr, L5: gl.constexpr, XB_L: gl.constexpr,
                XG_L: gl.constexpr):
    """Program (fb, k): h[k, fb*16 .. +16] = silu(x . gate) * (x . up) of the token's k-th expert (row slot_base +
    slot_ptr[k]); G groups a step, D steps a load (the next load issued before the current steps are computed); HW:
    h's layout (QConfig.hw: 0 rows in input order, 1 / 2 word-major, input 8w + j at j F / 8 + w, in h's dtype).
    GDC: wait for the previous kernel (which writes the slots) first."""
    if GDC:
        tl_cuda.gdc_wait()
        tl_cuda.gdc_launch_dependents()
    fb = gl.program_id(0)
    kk = gl.program_id(1)
    slot = gl.load(slot_ptr + kk).to(gl.int64) + slot_base
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
    mrow = slot * stride_ms + fc * stride_mn
    sbase = gl.where(r_c < 16, gs + srow, us + srow)  # [32]
    mbase = gl.where(r_c < 16, gm + mrow, um + mrow)
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
    if HW:
        h_at = (f_o % 8) * (F // 8) + f_o // 8
    else:
        h_at = f_o
    gl.store(h_ptr + kk * F + h_at, hv.to(h_ptr.dtype.element_ty), mask=f_o < F)


def _down_fn(h_ptr, slot_ptr, slot_base, wt_ptr, dq, ds, dm, y_ptr, D_OUT, stride_qs, stride_qn, stride_ss,
             stride_sn, stride_ms, stride_mn, KW: gl.constexpr, NG: gl.constexpr, G: gl.constexpr,
             WR: gl.constexpr, GDC: gl.constexpr, PRE: gl.constexpr, PAIR: gl.constexpr, MMA: gl.constexpr,
             A_L: gl.constexpr, B_L: gl.constexpr, W0_L: gl.constexpr, L5: gl.constexpr, XB_L: gl.constexpr,
             XG_L: gl.constexpr):
    """Program db: y[db*16 .. +16] = sum_k wt[k] (down_k . h[k]); warp k takes expert k (row slot_base +
    slot_ptr[k]) and h[k] (fp32, rounded to bf16 for the tensor cores), wt[k] rounded as WR says
    (fused_norm.weight_rounding); the warps' sums meet at the end. G groups a step, a step's words a load (the
    words [8, 16, 4, 2G] without a step dimension: layouts(ahead=0); the load-ahead structure of gate_up, with
    its step index bound inside nested static loops, failed to lower in Triton 3.6 at G 1 and 2: an assertion in
    ConvertTritonGPUToLLVM). GDC: wait for the previous kernel (which writes h); PRE: the slots, weights and first
    codes (written two or more kernels back) loaded before that wait."""
    if GDC and not PRE:
        tl_cuda.gdc_wait()
        tl_cuda.gdc_launch_dependents()
    db = gl.program_id(0)
    W3: gl.constexpr = gl.SliceLayout(3, W0_L)
    b_w = gl.arange(0, 8, layout=gl.SliceLayout(1, gl.SliceLayout(2, W3)))
    r_w = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, W3)))
    t_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, W3)))
    h_w = gl.arange(0, 2 * G, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, W0_L))))
    slot_w = gl.load(slot_ptr + b_w).to(gl.int64) + slot_base  # [8] each warp's expert
    d_w = db * 16 + r_w
    dw = gl.where(d_w < D_OUT, d_w, 0).to(gl.int64)
    rbase = dq + slot_w[:, None] * stride_qs + dw[None, :] * stride_qn  # [8, 16] row pointers
    col = (2 * G * t_w[None, None, :])[:, :, :, None] + h_w[None, None, None, :]  # [1, 1, 4, 2G]
    wptr = rbase[:, :, None, None] + col
    l_s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
    sh = (4 * (l_s // 2))[None, None, None, None, :]
    xoff, n5, g5 = _x_offsets(KW * 8, 8, G, XB_L)  # h[k] at its inputs
    C2: gl.constexpr = gl.SliceLayout(2, MMA)
    b_c = gl.arange(0, 8, layout=gl.SliceLayout(1, C2))
    r_c = gl.arange(0, 16, layout=gl.SliceLayout(0, C2))
    slot_c = gl.load(slot_ptr + b_c).to(gl.int64) + slot_base
    d_c = db * 16 + r_c
    dc = gl.where(d_c < D_OUT, d_c, 0).to(gl.int64)
    srow = slot_c[:, None] * stride_ss + dc[None, :] * stride_sn  # [8, 16]
    mrow = slot_c[:, None] * stride_ms + dc[None, :] * stride_mn
    n_c = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, MMA)))
    XG2: gl.constexpr = gl.SliceLayout(2, XG_L)
    b_g = gl.arange(0, 8, layout=gl.SliceLayout(1, XG2))
    n_g = gl.arange(0, 8, layout=gl.SliceLayout(0, XG2))
    i_g = gl.arange(0, 64, layout=gl.SliceLayout(0, gl.SliceLayout(1, XG_L)))
    tot = gl.zeros([8, 16], gl.float32, layout=C2)
    acc = gl.zeros([8, 16, 8], gl.float32, layout=MMA)
    wt = gl.load(wt_ptr + b_c)  # [8] routing weights (fp32)
    cur = gl.load(wptr)
    if GDC and PRE:
        tl_cuda.gdc_wait()
        tl_cuda.gdc_launch_dependents()
    for st in gl.static_range(NG // G):
        if st > 0:
            cur = gl.load(wptr + st * 8 * G)  # [8, 16, 4, 2G] int32
        xv = gl.load(h_ptr + st * 64 * G + xoff, mask=n5 == (G * st + g5) % 8, other=0.0).to(gl.bfloat16)
        acc = _mma_step(cur, xv, acc, sh, 8, 16, G, PAIR, A_L, B_L, L5)
        if ((st + 1) * G % 8 == 0) or (st == NG // G - 1):
            gn = (st * G // 8) * 8 + n_c  # [8] the groups of these columns
            ok = ((gn < NG)[None, :])[:, None, :]
            gk = (gn[None, :])[:, None, :].to(gl.int64)
            sv = gl.load(ds + srow[:, :, None] + gk, mask=ok, other=0.0).to(gl.float32)  # [8, 16, 8]
            mv = gl.load(dm + mrow[:, :, None] + gk, mask=ok, other=0.0).to(gl.float32)
            gx = (st * G // 8) * 8 + n_g
            okx = (gx < NG)[None, :]
            hx = gl.load(h_ptr + b_g[:, None, None] * (KW * 8) + gx[None, :, None] * 64 + i_g[None, None, :],
                         mask=okx[:, :, None], other=0.0)
            xs = gl.convert_layout(gl.sum(hx.to(gl.bfloat16).to(gl.float32), axis=2), gl.SliceLayout(1, MMA))
            tot += gl.sum(sv * (acc - 128.0 * xs[:, None, :]) + mv * xs[:, None, :], axis=2)
            acc = gl.zeros([8, 16, 8], gl.float32, layout=MMA)
    if WR == 1:
        wt = wt.to(gl.bfloat16).to(gl.float32)
    elif WR == 2:
        wt = wt.to(gl.float16).to(gl.float32)
    y = gl.sum(tot * wt[:, None], axis=0)  # [16]
    d_o = db * 16 + gl.arange(0, 16, layout=y.type.layout)
    gl.store(y_ptr + d_o, y.to(y_ptr.dtype.element_ty), mask=d_o < D_OUT)


_steps = _word_ptrs = _x_offsets = _mma_step = GATE_UP = DOWN = None
if gluon is not None:
    _steps = gluon.jit(_steps_fn)
    _word_ptrs = gluon.jit(_word_ptrs_fn)
    _x_offsets = gluon.jit(_x_offsets_fn)
    _mma_step = gluon.jit(_mma_step_fn)
    GATE_UP = gluon.jit(_gate_up_fn)
    DOWN = gluon.jit(_down_fn)


def gate_up(x: Tensor, slots: Tensor, gate: QuantWeight, up: QuantWeight, *, slot_base: int = 0, h_layout: int = 0,
            groups: int = 2, ahead: int = 1, launch: dict | None = None, regs: int = 0) -> Tensor:
    """x [1, D] bf16, slots [K] int64 (rows slot_base + slots of the stacks) -> h [K, F] = silu(x gate^T) * (x up^T),
    fp32 (bf16 with h_layout 2), rows in input order (h_layout 0) or word-major (1, 2: QConfig.hw). groups, ahead:
    G and D (fewer where they do not divide); launch: pdl.launch_args(device) to launch with PDL; regs: ptxas's
    register cap (QConfig.regs; 0: its own choice, about 76 at the 10.6B shape, where it issues a program's word
    loads in four rounds, each next to its first use; at 128 it issues them in two). gate_up_ok must hold."""
    if not gate_up_ok(x, gate, up):
        raise ValueError(f"the Gluon gate_up does not serve x {x.dtype} {list(x.shape)} on {x.device} with "
                         f"{gate.fmt} stacks {list(gate.shape)} in groups of {gate.group}; use quant_moe.quant_gate_up")
    f, d = gate.matrix
    k = slots.numel()
    gq, uq = gate.q.view(torch.int32), up.q.view(torch.int32)
    uoff = (uq.data_ptr() - gq.data_ptr()) // 64  # up's codes from gate's, in 16-word units
    h = torch.empty(k, f, dtype=torch.bfloat16 if h_layout == 2 else torch.float32, device=x.device)
    G, D = fit(d // GROUP // WARPS, groups, ahead)
    opts = dict(launch or {})
    gdc = bool(opts.pop("GDC", False))
    opts.pop("PRE", None)
    if regs:
        opts["maxnreg"] = int(regs)
    GATE_UP[(-(-f // ROWS), k)](x, slots.reshape(-1), int(slot_base), gq, uoff, gate.scale, up.scale, gate.min,
                                up.min, h, f, gq.stride(0), gq.stride(1), gate.scale.stride(0), gate.scale.stride(1),
                                gate.min.stride(0), gate.min.stride(1), KW=d // 8, NG=d // GROUP, G=G, D=D,
                                HW=int(h_layout), GDC=gdc, PAIR=PAIR, **layouts(groups=G, ahead=D),
                                num_warps=WARPS, **opts)
    return h


def down(h: Tensor, slots: Tensor, weights: Tensor, dw: QuantWeight, dtype: torch.dtype, *, slot_base: int = 0,
         round_to: torch.dtype | None = None, groups: int = 4, launch: dict | None = None) -> Tensor:
    """h [8, F] fp32, slots [8] int64, weights [8] fp32 (CUDA) -> y [1, D] in `dtype` = sum_k w_k (dw[slot_base +
    slots[k]] . round_bf16(h[k])), w_k rounded to `round_to` (None: as given); groups: G (fewer where it does not
    divide a row's groups). launch: pdl.launch_args(device) (with PRE False: nothing loaded before the wait). down_ok
    must hold."""
    from tiered.kernels.fused_norm import weight_rounding

    if not down_ok(h, slots, dw):
        raise ValueError(f"the Gluon down does not serve h {h.dtype} {list(h.shape)} on {h.device}, "
                         f"{slots.numel()} experts, with a {dw.fmt} stack {list(dw.shape)} in groups of {dw.group} "
                         "(it takes 8 experts' fp32 rows and q4 in groups of 64); use quant_moe.quant_down")
    d, f = dw.matrix
    q = dw.q.view(torch.int32)
    y = torch.empty(1, d, dtype=dtype, device=h.device)
    G = fit(f // GROUP, groups, 1)[0]
    opts = dict(launch or {})
    gdc = bool(opts.pop("GDC", False))
    pre = bool(opts.pop("PRE", True)) and gdc
    DOWN[(-(-d // 16),)](h, slots.reshape(-1), int(slot_base), weights.reshape(-1).float(), q, dw.scale, dw.min, y,
                         d, q.stride(0), q.stride(1), dw.scale.stride(0), dw.scale.stride(1), dw.min.stride(0),
                         dw.min.stride(1), KW=f // 8, NG=f // GROUP, G=G, WR=weight_rounding(round_to),
                         GDC=gdc, PRE=pre, PAIR=PAIR, **layouts(DOWN_EXPERTS, 16, G, 0), num_warps=DOWN_EXPERTS,
                         **opts)
    return y


def emulate_gate_up(x: Tensor, slots: Tensor, gate: QuantWeight, up: QuantWeight, groups: int = 1) -> Tensor:
    """gate_up's logical computation in torch (CPU), fp64 -> [K, F]: each warp's K quarter through quant_gluon.emulate
    (the same word, nibble and x indices, `groups` groups a step, the 8-group epilogue with its 128 offset), the
    warps' sum, silu(gate) * up."""
    from tiered.kernels.quant_gluon import emulate

    f, d = gate.matrix
    gpw = d // GROUP // WARPS
    groups = fit(gpw, groups, 1)[0]
    x = x.reshape(-1)
    out = []
    for s in slots.reshape(-1).tolist():
        gate_row, up_row = (sum(emulate(x, w[s], b * gpw, gpw, groups) for b in range(WARPS)) for w in (gate, up))
        out.append(torch.nn.functional.silu(gate_row) * up_row)
    return torch.stack(out)


def emulate_down(h: Tensor, slots: Tensor, weights: Tensor, dw: QuantWeight, groups: int = 1) -> Tensor:
    """down's logical computation in torch (CPU), fp64 -> [D]: warp k's expert through quant_gluon.emulate (the same
    words, nibbles and h offsets, h rounded to bf16, the 8-group epilogue), the routing weight, the warps' sum."""
    from tiered.kernels.quant_gluon import emulate

    groups = fit(dw.matrix[1] // GROUP, groups, 1)[0]
    return sum(float(weights.reshape(-1)[b]) * emulate(h[b].to(torch.bfloat16), dw[s], groups=groups)
               for b, s in enumerate(slots.reshape(-1).tolist()))
