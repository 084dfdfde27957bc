"""The dense q4 GEMV on tensor cores, written in Gluon (Triton's explicit-layout language): QConfig.algo 3 of
quant_moe.quant_matvec for one q4 matrix in groups of 64.

Owns: the kernel, its layouts (`layouts`), the launcher (`matvec`), where it serves (`gemv_ok`) and `emulate`, the
kernel's own index math in torch (Gluon has no interpreter: the CPU tests check that, the GPU tests the kernel).
Does not own: the quantized layout (tiered.layout.quant), the choice of tiles (quant_moe.TUNED / TIERED_QCONFIG),
PDL's switches (pdl.launch_args).

Why: the word tile (quant_moe._dot_rows_words) issues 3.69 SASS instructions an input (tools/count_sass.py), and on
the H200 the q4 lm_head reads 57% of HBM there; this kernel issues 1.57 at 128 rows a program (Triton 3.6 and 3.9,
sm_90, tools/gluon_q4_probe.py) and nothing goes through shared memory:
- A [BN, 64] (one group of 64 inputs a step) is in DotOperandLayout(0, mma v2, k_width 8): a thread holds 8
  consecutive K of a row, i.e. one stored int32 word (8 nibbles). The words are loaded as [BN, 4 (t), 2 (h)] (word
  2t + h of the step: a thread's two words of a row are adjacent, one 8-byte load), permuted to [BN, 2, 4] and
  widened to [BN, 2, 4, 8]; that reshapes to [BN, 64] with K order k = 32 h + 8 t + l, which is A's layout
  exactly (every convert_layout here is asserted trivial at compile time).
- A code pair becomes bf16x2 (128 + c) with one shift and one lop3 (inline PTX, two lanes of a pack): logical l =
  2i + e holds stored nibble i + 4e, so l's pair (2i, 2i + 1) is nibbles (i, i + 4), 16 bits apart after w >> 4i.
  128 + c is exact in bf16, so the tensor cores' products are exact up to x's own rounding.
- B [64, 8] holds x block-diagonally: column n is x for the step's group when n = step mod 8, else 0 (a masked
  16-byte load a thread, stored order, then the same nibble permutation in registers). The accumulator [BN, 8]
  fp32 so holds each row's dot with each of 8 groups, and every 8 groups the scales and minima apply:
  out += sum_n s (acc - 128 xs) + m xs, xs the group sums of x.
G groups a step (G 2 or 4): A [BN, 64G], B [64G, 8] with group G st + g in column (G st + g) mod 8, and the K order
k = 32 h + 8 t + l (h < 2G) taken from stored word 2G t + h, so a thread's 2G words of a row are adjacent (16-byte
loads). D steps a load: the words of D steps come in one load and the next D steps' load is issued before these
are computed, so D to 2D steps of words are in flight. With PDL (GDC) the program loads its first steps of weights
(PRE) before it waits for the previous kernel: weights are never written by a decode step (pdl.py says what may be
read before the wait).
Measured (session 44, H100, lm_head 151,936 x 2,048, us with PDL): G 1 D 1 88.1; G 1 D 4 74.3; G 2 D 4 at BN 128
68.6, against the word tile's 70.9 (65.4 without PDL); in the decode step 0.99x of the word tile
(benchmarks/results/gluon-q4-g2-2026-12-06-h100-s44.json), so TUNED keeps the word tile.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from tiered.layout.quant import QuantWeight

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    from triton.language.extra import cuda as tl_cuda
except ImportError:  # pragma: no cover - the CPU torch wheel without triton, or a Triton without Gluon
    triton = gluon = gl = mma_v2 = tl_cuda = None

GROUP = 64  # inputs a quantization group: the kernel's step
PAIR = "{ .reg .b32 t; shr.b32 t, $1, $3; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"
# ^ (w >> s) & 0x000F000F | 0x43004300: nibbles s/4 and s/4 + 4 of word w as the bf16 pair (128 + c0, 128 + c1)


def available() -> bool:
    """Whether this Triton has Gluon (3.5+; the GPU box's 3.6 and CI's 3.9 do)."""
    return gluon is not None


def weight_ok(w: QuantWeight) -> bool:
    """Whether the kernel reads this weight: one q4 matrix (no stack) in groups of 64, rows of whole groups, codes
    and scales in contiguous rows that can be read as int32 words."""
    q = w.q
    return (w.fmt == "q4" and w.group == GROUP and not w.lead and w.matrix[1] % GROUP == 0 and q.stride(-1) == 1
            and q.stride(0) % 4 == 0 and q.storage_offset() % 4 == 0 and q.data_ptr() % 16 == 0
            and w.scale.stride(-1) == 1 and w.min is not None and w.min.stride(-1) == 1)


def gemv_ok(x: Tensor, w: QuantWeight) -> bool:
    """Whether `matvec` serves x @ w^T: Gluon, x bf16 on a CUDA device with mma.sync v2 (compute capability 8.0+)
    in contiguous rows, and a weight weight_ok takes."""
    if not (available() and x.is_cuda and x.dtype == torch.bfloat16 and x.stride(-1) == 1 and weight_ok(w)):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 8


@functools.lru_cache(maxsize=64)
def layouts(bn: int, ahead: int = 1, groups: int = 1) -> dict:
    """The kernel's layouts for BN rows a program (64 x 2^i), 4 warps, `ahead` steps a load (1, 2 or 4) and `groups`
    groups a step (1, 2 or 4; see the module docstring). Cached (a launch would build them again): callers spread
    the dict, never change it."""
    if bn < 64 or bn & (bn - 1):
        raise ValueError(f"the Gluon q4 GEMV takes 64 x 2^i rows a program (QConfig.bn), got {bn}")
    if ahead not in (1, 2, 4):
        raise ValueError(f"the Gluon q4 GEMV loads 1, 2 or 4 steps at a time (QConfig.ahead), got {ahead}")
    if groups not in (1, 2, 4):
        raise ValueError(f"the Gluon q4 GEMV takes 1, 2 or 4 groups a step (QConfig.bg), got {groups}")
    hs = range(groups.bit_length())  # the bits of h, a thread's word of a row in a step (2 x groups of them)
    hi = [64 << i for i in range((bn // 64).bit_length() - 1)]  # rows 64, 128, ... in registers
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
    steps = [[0, 0, 0, 1 << i] for i in range(ahead.bit_length() - 1)]  # the steps of a load, in registers
    w0 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 1 << i, 0] for i in hs] + [[8, 0, 0, 0]]
                                    + [[r, 0, 0, 0] for r in hi] + steps,
                                    lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
                                    warp_bases=[[16, 0, 0, 0], [32, 0, 0, 0]], block_bases=[],
                                    shape=[bn, 4, 2 * groups, ahead])
    l4 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4], [8, 0, 0, 0]]
                                    + [[0, 1 << i, 0, 0] for i in hs] + [[r, 0, 0, 0] for r in hi],
                                    lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
                                    warp_bases=[[16, 0, 0, 0], [32, 0, 0, 0]], block_bases=[],
                                    shape=[bn, 2 * groups, 4, 8])
    xb4 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]]
                                     + [[1 << i, 0, 0, 0] for i in hs],
                                     lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]],
                                     warp_bases=[[0, 0, 0, 0], [0, 0, 0, 0]], block_bases=[],
                                     shape=[2 * groups, 4, 8, 8])
    xg = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])
    return dict(MMA=mma, A_L=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8),
                B_L=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8), W0_L=w0, L4=l4, XB_L=xb4, XG_L=xg)


def _kernel_fn(x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_xt, stride_qn, stride_sn, stride_mn, stride_ot,
               KW: gl.constexpr, NG: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, G: gl.constexpr,
               PAIR: gl.constexpr, PERSIST: gl.constexpr, GDC: gl.constexpr, PRE: gl.constexpr, MMA: gl.constexpr,
               A_L: gl.constexpr, B_L: gl.constexpr, W0_L: gl.constexpr, L4: gl.constexpr, XB_L: gl.constexpr,
               XG_L: gl.constexpr):
    """Row t = program_id(1) of x; a block of BN rows a program, or (PERSIST) blocks pid, pid + programs, ..."""
    # what every block shares: the word columns, the pairs' shifts, x's offsets, the epilogue's columns
    W3: gl.constexpr = gl.SliceLayout(3, W0_L)
    r_w = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, W3)))
    t_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, W3)))
    h_w = gl.arange(0, 2 * G, layout=gl.SliceLayout(0, gl.SliceLayout(1, W3)))
    d_w = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, W0_L))))
    wcol = 2 * G * t_w[None, :, None, None] + h_w[None, None, :, None] + 8 * G * d_w[None, None, None, :]  # [1,4,2G,D]
    l_s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    sh = (4 * (l_s // 2))[None, None, None, :]  # the pair (2i, 2i + 1) shifts the word by 4i
    XB3: gl.constexpr = gl.SliceLayout(3, XB_L)
    h_x = gl.arange(0, 2 * G, layout=gl.SliceLayout(1, gl.SliceLayout(2, XB3)))
    t_x = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, XB3)))
    j_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, XB3)))
    n_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, XB_L))))
    xw = 2 * G * t_x[None, :, None] + h_x[:, None, None]  # [2G, 4, 1]: the stored word of (h, t) in a step
    xoff = 8 * xw + j_x[None, None, :]  # [2G, 4, 8] stored order
    xoff4, n4 = gl.broadcast(xoff[:, :, :, None], n_x[None, None, None, :])  # [2G, 4, 8, 8]
    g4 = gl.broadcast(xoff4, (xw // 8)[:, :, :, None])[1]  # the group (0 .. G - 1) of each x within its step
    r_o = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    n_c = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    g_x = gl.arange(0, 8, layout=gl.SliceLayout(1, XG_L))
    i_x = gl.arange(0, 64, layout=gl.SliceLayout(0, XG_L))
    t = gl.program_id(1).to(gl.int64)
    xt = x_ptr + t * stride_xt
    ot = out_ptr + t * stride_ot
    if PERSIST:
        if GDC:
            tl_cuda.gdc_wait()
            tl_cuda.gdc_launch_dependents()
        for blk in range(gl.program_id(0), gl.cdiv(N, BN), gl.num_programs(0)):
            _block(blk, xt, q_ptr, s_ptr, m_ptr, ot, N, stride_qn, stride_sn, stride_mn, r_w, wcol, sh, xoff4, n4,
                   g4, r_o, n_c, g_x, i_x, KW, NG, BN, D, G, PAIR, False, False, MMA, A_L, B_L, L4)
    else:
        _block(gl.program_id(0), xt, q_ptr, s_ptr, m_ptr, ot, N, stride_qn, stride_sn, stride_mn, r_w, wcol, sh,
               xoff4, n4, g4, r_o, n_c, g_x, i_x, KW, NG, BN, D, G, PAIR, GDC, PRE, MMA, A_L, B_L, L4)


def _block_fn(blk, x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_qn, stride_sn, stride_mn, r_w, wcol, sh, xoff4, n4,
              g4, r_o, n_c, g_x, i_x, KW: gl.constexpr, NG: gl.constexpr, BN: gl.constexpr, D: gl.constexpr,
              G: gl.constexpr, PAIR: gl.constexpr, GDC: gl.constexpr, PRE: gl.constexpr, MMA: gl.constexpr,
              A_L: gl.constexpr, B_L: gl.constexpr, L4: gl.constexpr):
    """Rows blk * BN .. of the product: the words of D steps a load, the next D steps' load issued before the
    current ones are computed (so D to 2D steps of a thread's words are in flight); GDC: wait for the previous
    kernel here, after the first load when PRE."""
    rows_w = blk * BN + r_w
    rw = gl.where(rows_w < N, rows_w, 0).to(gl.int64)  # rows past N read row 0 (never stored)
    wptr = q_ptr + rw[:, None, None, None] * stride_qn + wcol  # [BN, 4 (t), 2G (h), D (step)]
    r_c = blk * BN + r_o
    rc = gl.where(r_c < N, r_c, 0).to(gl.int64)
    if PRE:
        cur = gl.load(wptr)
    if GDC:
        tl_cuda.gdc_wait()
        tl_cuda.gdc_launch_dependents()
    if not PRE:
        cur = gl.load(wptr)
    out = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, MMA))
    acc = gl.zeros([BN, 8], gl.float32, layout=MMA)
    SUP: gl.constexpr = KW // (8 * G) // D
    for j in gl.static_range(SUP):
        if j + 1 < SUP:
            nxt = gl.load(wptr + (j + 1) * 8 * G * D)
        parts = _steps_of(cur, BN, G, D)
        for d in gl.static_range(D):
            out, acc = _step(parts[d], D * j + d, out, acc, x_ptr, s_ptr, m_ptr, rc, stride_sn, stride_mn, sh, xoff4,
                             n4, g4, n_c, g_x, i_x, KW, NG, BN, G, PAIR, MMA, A_L, B_L, L4)
        if j + 1 < SUP:
            cur = nxt
    gl.store(out_ptr + r_c, out.to(out_ptr.dtype.element_ty), mask=r_c < N)


def _steps_of_fn(cur, BN: gl.constexpr, G: gl.constexpr, D: gl.constexpr):
    """A load's words [BN, 4 (t), 2G (h), D] as the tuple of its D steps' [BN, 4, 2G] (step 2a + b at [..., a, b])."""
    if D == 1:
        return (gl.reshape(cur, [BN, 4, 2 * G]),)
    elif D == 2:
        return gl.split(cur)
    else:
        ev, od = gl.split(gl.reshape(cur, [BN, 4, 2 * G, 2, 2]))
        w0, w2 = gl.split(ev)
        w1, w3 = gl.split(od)
        return (w0, w1, w2, w3)


def _step_fn(w, st: gl.constexpr, out, acc, x_ptr, s_ptr, m_ptr, rc, stride_sn, stride_mn, sh, xoff4, n4, g4, n_c,
             g_x, i_x, KW: gl.constexpr, NG: gl.constexpr, BN: gl.constexpr, G: gl.constexpr, PAIR: gl.constexpr,
             MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, L4: gl.constexpr):
    """Step st (G groups: 8G words, 64G inputs) of a block from its words w [BN, 4 (t), 2G (h)]: the codes' pairs as
    A, x block-diagonal as B (a column a group), one mma; after every 8 groups (and the last) the scales and minima
    apply."""
    w = gl.convert_layout(gl.permute(w, [0, 2, 1]), gl.SliceLayout(3, L4), assert_trivial=True)  # [BN, 2G, 4]
    w4, s4 = gl.broadcast(w[:, :, :, None], sh)
    cb = gl.inline_asm_elementwise(PAIR, "=r,r,r,r,r", [w4, s4], dtype=gl.bfloat16, is_pure=True, pack=2)
    a = gl.convert_layout(gl.reshape(cb, [BN, 64 * G]), A_L, assert_trivial=True)
    if G == 1:
        xv = gl.load(x_ptr + st * 64 + xoff4, mask=n4 == st % 8, other=0.0)  # [2, 4, 8 (j), 8 (n)]
    else:  # x of group G st + g in column (G st + g) mod 8
        xv = gl.load(x_ptr + st * 64 * G + xoff4, mask=n4 == (G * st + g4) % 8, other=0.0)
    xv = gl.reshape(gl.permute(gl.reshape(xv, [2 * G, 4, 2, 4, 8]), [0, 1, 3, 2, 4]), [64 * G, 8])  # j -> l
    acc = mma_v2(a, gl.convert_layout(xv, B_L, assert_trivial=True), acc)
    if ((st + 1) * G % 8 == 0) or (st == KW // (8 * G) - 1):  # the scales and minima of these (up to) 8 groups
        gs = (st * G // 8) * 8 + n_c
        gm = gs[None, :] < NG
        sv = gl.load(s_ptr + rc[:, None] * stride_sn + gs[None, :], mask=gm, other=0.0).to(gl.float32)
        mv = gl.load(m_ptr + rc[:, None] * stride_mn + gs[None, :], mask=gm, other=0.0).to(gl.float32)
        gx = (st * G // 8) * 8 + g_x
        xx = gl.load(x_ptr + gx[:, None] * 64 + i_x[None, :], mask=(gx < NG)[:, None], other=0.0)
        xs = gl.convert_layout(gl.sum(xx.to(gl.float32), axis=1), gl.SliceLayout(0, MMA))
        out += gl.sum(sv * (acc - 128.0 * xs[None, :]) + mv * xs[None, :], axis=1)
        acc = gl.zeros([BN, 8], gl.float32, layout=MMA)
    return out, acc


_step = _steps_of = _block = KERNEL = None
if gluon is not None:
    _step = gluon.jit(_step_fn)
    _steps_of = gluon.jit(_steps_of_fn)
    _block = gluon.jit(_block_fn)
    KERNEL = gluon.jit(_kernel_fn)


def constexprs(k: int, bn: int, *, ahead: int = 1, groups: int = 1, persist: bool = False, gdc: bool = False,
               pre: bool = False) -> dict:
    """The kernel's constexprs for rows of k inputs, bn rows a program, `groups` groups a step and `ahead` steps a
    load (each a divisor of what it divides: fewer where it does not; tools/gluon_q4_probe.py compiles with these
    offline)."""
    ng = k // GROUP
    while ng % groups:
        groups //= 2
    while (ng // groups) % ahead:
        ahead //= 2
    return dict(KW=k // 8, NG=ng, BN=bn, D=ahead, G=groups, PAIR=PAIR, PERSIST=persist, GDC=gdc,
                PRE=pre and gdc and not persist, **layouts(bn, ahead, groups))


def matvec(x: Tensor, w: QuantWeight, *, out_dtype: torch.dtype | None = None, bn: int = 128, ahead: int = 1,
           groups: int = 1, persist: int = 0, launch: dict | None = None) -> Tensor:
    """out [T, N] = x [T, K] @ W^T for one q4 matrix (gemv_ok must hold). bn: rows a program (64 x 2^i); ahead: steps
    of words a load (1, 2, 4), the next load issued before the current steps are computed; groups: groups a step (1:
    a thread's words of a row in a step are 8 bytes, 2 or 4: 16 a load); persist P:
    at most P programs a SM, each looping over blocks (0: a program a block); launch: pdl.launch_args(device)'s
    {"GDC": True, "launch_pdl": True} to launch with PDL (the first step of weights loaded before the wait unless
    `launch` says PRE=False)."""
    if not gemv_ok(x, w):
        raise ValueError(f"the Gluon q4 GEMV does not serve x {x.dtype} {list(x.shape)} on {x.device} with a "
                         f"{w.fmt} weight {list(w.shape)} in groups of {w.group} (it takes bf16 x on CUDA and one q4 "
                         f"matrix in groups of {GROUP}); use quant_moe.quant_matvec")
    n, k = w.matrix
    T = x.shape[0]
    opts = dict(launch or {})
    gdc = bool(opts.pop("GDC", False))
    pre = bool(opts.pop("PRE", True))
    codes = w.q.view(torch.int32)
    out = torch.empty(T, n, dtype=out_dtype or x.dtype, device=x.device)
    blocks = triton.cdiv(n, bn)
    if persist:
        blocks = min(blocks, persist * torch.cuda.get_device_properties(x.device).multi_processor_count)
    KERNEL[(blocks, T)](x, codes, w.scale, w.min, out, n, x.stride(0), codes.stride(0), w.scale.stride(0),
                        w.min.stride(0), out.stride(0),
                        **constexprs(k, bn, ahead=ahead, groups=groups, persist=bool(persist), gdc=gdc, pre=pre),
                        num_warps=4, **opts)
    return out


def emulate(x: Tensor, w: QuantWeight, first: int = 0, count: int | None = None, groups: int = 1) -> Tensor:
    """The kernel's logical computation for one row x [K] in torch (CPU, fp64 sums): the same word, nibble and x
    indices, the 8-group accumulator with its 128 offset and the epilogue, `groups` groups a step. Checks the index
    math without a GPU. first, count: only groups first .. first + count - 1, the epilogue every 8 of them (a K
    slice, as tools/gluon_q4_experts_probe.py's warps take)."""
    if w.fmt != "q4" or w.group != GROUP or w.lead or w.matrix[1] % GROUP:
        raise ValueError(f"emulate takes one q4 matrix in groups of {GROUP}, got {w.fmt}, group {w.group}, "
                         f"shape {list(w.shape)}")
    n, k = w.matrix
    words = w.q.view(torch.int32).long() & 0xFFFFFFFF  # [N, KW]
    xs = x.double()
    s, m = w.scale.double(), w.min.double()
    kk = torch.arange(64 * groups)
    h, t, lo = kk // 32, (kk // 8) % 4, kk % 8
    word = 2 * groups * t + h  # the stored word (of the step's 8G) of each K position
    nib = lo // 2 + 4 * (lo % 2)  # l = 2i + e holds stored nibble i + 4e
    out = torch.zeros(n, dtype=torch.float64)
    acc = torch.zeros(n, 8, dtype=torch.float64)
    total = k // GROUP - first if count is None else count
    if total % groups:
        raise ValueError(f"{total} groups do not make steps of {groups}")
    steps = total // groups
    for st in range(steps):
        g0 = first + st * groups  # the step's first group
        a = 128 + ((words[:, g0 * 8 + word] >> (4 * nib)) & 0xF)  # [N, 64G]
        b = torch.zeros(64 * groups, 8, dtype=torch.float64)
        b[kk, (st * groups + word // 8) % 8] = xs[g0 * 64 + 8 * word + nib]  # a column a group: x at the same inputs
        acc += a.double() @ b
        if (st + 1) * groups % 8 == 0 or st == steps - 1:
            j = (st * groups // 8) * 8 + torch.arange(8)
            ok = j < total
            gg = first + j[ok]
            gsum = torch.zeros(8, dtype=torch.float64)
            gsum[ok] = xs.view(-1, GROUP)[gg].sum(1)
            sv = torch.zeros(n, 8, dtype=torch.float64)
            mv = torch.zeros(n, 8, dtype=torch.float64)
            sv[:, ok], mv[:, ok] = s[:, gg], m[:, gg]
            out += (sv * (acc - 128 * gsum) + mv * gsum).sum(1)
            acc.zero_()
    return out
