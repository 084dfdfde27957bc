"""A q4 GEMV on tensor cores written in Gluon (Triton's explicit-layout language): each thread loads the stored words
whose nibbles are its own mma.sync fragment slots, so nothing goes through shared memory. A probe for issue 13: not
used by the engine.

    python3 tools/gluon_q4_probe.py            # offline: SASS per input for sm_90, and the index math checked on CPU
    python3 tools/gluon_q4_probe.py --gpu      # on the GPU box: the kernel against the reference, then timed
                                               # against TUNED's q4 GEMV at the lm_head, qkv and o_proj shapes

Why: on the H200 the q4 lm_head (151,936 x 2,048) reads 57% of HBM at 3.69 SASS an input (tools/count_sass.py,
TUNED's word tile), so fewer instructions an input is the lever there; tl.dot does not give it (tools/
mma_q4_sass.py: 3.8-4.6, the operand goes through shared memory). Here the layouts are explicit:
- A [BN, 64] (one group of 64 inputs a step) is in DotOperandLayout(0, mma v2, k_width 8): a thread holds 8
  consecutive K of a row, i.e. one stored int32 word (8 nibbles). The words are loaded as [BN, 4 (t), 2 (h)] (word
  2t + h of the step: a thread's two words of a row are adjacent, one 8-byte load), permuted to [BN, 2, 4] and
  widened to [BN, 2, 4, 8]; that reshapes to [BN, 64] with K order k = 32 h + 8 t + l, which is A's layout
  exactly (every convert_layout here is asserted trivial at compile time).
- A code pair becomes bf16x2 (128 + c) with one shift and one lop3 (inline PTX, two lanes of a pack): logical l =
  2i + e holds stored nibble i + 4e, so l's pair (2i, 2i + 1) is nibbles (i, i + 4), 16 bits apart after w >> 4i.
- B [64, 8] holds x block-diagonally: column n is x for the step's group when n = step mod 8, else 0 (a masked
  16-byte load a thread, stored order, then the same nibble permutation in registers). The accumulator [BN, 8]
  fp32 so holds each row's dot with each of 8 groups, and every 8 groups the scales and minima apply:
  out += sum_n s (acc - 128 xs) + m xs, xs the group sums of x.
Counted offline (Triton 3.9 and 3.6, sm_90, 4 warps): 1.88 / 1.57 / 1.41 SASS an input at BN 64 / 128 / 256 (63 /
92 / 180 registers) against the word tile's 3.69: per pair a lop3 and (3 in 4) a shift, plus PRMT for x's pairs.
Needs: K a multiple of 64, a group of 64, bf16 x. The Gluon kernel cannot run under Triton's interpreter, so the
CPU check runs `emulate`, the kernel's own index math in torch, against quant_matvec_ref; the kernel itself is
checked only by --gpu.
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

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # pragma: no cover - a Triton without Gluon
    triton = gluon = gl = mma_v2 = None

GROUP = 64
DENSE = {"lm_head": (151936, 2048), "qkv": (5120, 2048), "o_proj": (2048, 4096)}


def layouts(bn: int) -> dict:
    """The kernel's layouts for BN rows a program (64 x 2^i), 4 warps (see the module docstring)."""
    if bn % 64 or bn & (bn - 1):
        raise ValueError(f"BN must be 64 times a power of two, got {bn}")
    hi = [64 << i for i in range((bn // 64).bit_length() - 1)]  # rows 64, 128, ... in registers
    mma = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1], instr_shape=[16, 8])
    rows3 = dict(lane=[[1, 0, 0], [2, 0, 0], [4, 0, 0]], warp=[[16, 0, 0], [32, 0, 0]])
    w0 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [8, 0, 0]] + [[r, 0, 0] for r in hi],
                                    lane_bases=[[0, 1, 0], [0, 2, 0]] + rows3["lane"], warp_bases=rows3["warp"],
                                    block_bases=[], shape=[bn, 4, 2])
    l4 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4], [8, 0, 0, 0], [0, 1, 0, 0]]
                                    + [[r, 0, 0, 0] for r in hi],
                                    lane_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0], [2, 0, 0, 0], [4, 0, 0, 0]],
                                    warp_bases=[[16, 0, 0, 0], [32, 0, 0, 0]], block_bases=[], shape=[bn, 2, 4, 8])
    xb4 = gl.DistributedLinearLayout(reg_bases=[[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0], [1, 0, 0, 0]],
                                     lane_bases=[[0, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]],
                                     warp_bases=[[0, 0, 0, 0], [0, 0, 0, 0]], block_bases=[], shape=[2, 4, 8, 8])
    xg = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])
    return dict(MMA=mma, A_L=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=8),
                B_L=gl.DotOperandLayout(operand_index=1, parent=mma, k_width=8), W0_L=w0, L4=l4, XB_L=xb4, XG_L=xg)


def _kernel(x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_qn, stride_sn, stride_mn,
            KW: gl.constexpr, NG: gl.constexpr, BN: gl.constexpr, PAIR: gl.constexpr, PERSIST: gl.constexpr,
            MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, W0_L: gl.constexpr, L4: gl.constexpr,
            XB_L: gl.constexpr, XG_L: gl.constexpr):
    """A block of BN rows a program, or (PERSIST) blocks pid, pid + programs, ..."""
    # what every block shares: the word columns, the pairs' shifts, x's offsets, the epilogue's columns
    r_w = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, W0_L)))
    t_w = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, W0_L)))
    h_w = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, W0_L)))
    wcol = 2 * t_w[None, :, None] + h_w[None, None, :]  # [1, 4, 2]: word 2t + h of a step
    l_s = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
    sh = (4 * (l_s // 2))[None, None, None, :]  # the pair (2i, 2i + 1) shifts the word by 4i
    XB3: gl.constexpr = gl.SliceLayout(3, XB_L)
    h_x = gl.arange(0, 2, layout=gl.SliceLayout(1, gl.SliceLayout(2, XB3)))
    t_x = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, XB3)))
    j_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, XB3)))
    n_x = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, XB_L))))
    xoff = 8 * (2 * t_x[None, :, None] + h_x[:, None, None]) + j_x[None, None, :]  # [2, 4, 8] stored order
    xoff4, n4 = gl.broadcast(xoff[:, :, :, None], n_x[None, None, None, :])  # [2, 4, 8, 8]
    r_o = gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    n_c = gl.arange(0, 8, layout=gl.SliceLayout(0, MMA))
    g_x = gl.arange(0, 8, layout=gl.SliceLayout(1, XG_L))
    i_x = gl.arange(0, 64, layout=gl.SliceLayout(0, XG_L))
    if PERSIST:
        for blk in range(gl.program_id(0), gl.cdiv(N, BN), gl.num_programs(0)):
            _block(blk, x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_qn, stride_sn, stride_mn, r_w, wcol, sh, xoff4,
                   n4, r_o, n_c, g_x, i_x, KW, NG, BN, PAIR, MMA, A_L, B_L, L4)
    else:
        _block(gl.program_id(0), x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_qn, stride_sn, stride_mn, r_w, wcol, sh,
               xoff4, n4, r_o, n_c, g_x, i_x, KW, NG, BN, PAIR, MMA, A_L, B_L, L4)


def _block_fn(blk, x_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, stride_qn, stride_sn, stride_mn, r_w, wcol, sh, xoff4, n4,
              r_o, n_c, g_x, i_x, KW: gl.constexpr, NG: gl.constexpr, BN: gl.constexpr, PAIR: gl.constexpr,
              MMA: gl.constexpr, A_L: gl.constexpr, B_L: gl.constexpr, L4: gl.constexpr):
    """Rows blk * BN .. of the product (the module docstring's steps and epilogue)."""
    rows_w = blk * BN + r_w
    rw = gl.where(rows_w < N, rows_w, 0).to(gl.int64)  # rows past N read row 0 (never stored)
    wptr = q_ptr + rw[:, None, None] * stride_qn + wcol
    r_c = blk * BN + r_o
    rc = gl.where(r_c < N, r_c, 0).to(gl.int64)
    out = gl.zeros([BN], gl.float32, layout=gl.SliceLayout(1, MMA))
    acc = gl.zeros([BN, 8], gl.float32, layout=MMA)
    for st in gl.static_range(KW // 8):  # a step: one group (8 words, 64 inputs)
        w = gl.load(wptr + st * 8)  # [BN, 4 (t), 2 (h)] int32
        w = gl.convert_layout(gl.permute(w, [0, 2, 1]), gl.SliceLayout(3, L4), assert_trivial=True)  # [BN, 2, 4]
        w4, s4 = gl.broadcast(w[:, :, :, None], sh)
        cb = gl.inline_asm_elementwise(PAIR, "=r,r,r,r,r", [w4, s4], dtype=gl.bfloat16, is_pure=True, pack=2)
        a = gl.convert_layout(gl.reshape(cb, [BN, 64]), A_L, assert_trivial=True)
        xv = gl.load(x_ptr + st * 64 + xoff4, mask=n4 == st % 8, other=0.0)  # [2, 4, 8 (j), 8 (n)]
        xv = gl.reshape(gl.permute(gl.reshape(xv, [2, 4, 2, 4, 8]), [0, 1, 3, 2, 4]), [64, 8])  # j -> l
        acc = mma_v2(a, gl.convert_layout(xv, B_L, assert_trivial=True), acc)
        if (st % 8 == 7) or (st == KW // 8 - 1):  # the scales and minima of these (up to) 8 groups
            gs = (st // 8) * 8 + n_c
            gm = gs[None, :] < NG
            sv = gl.load(s_ptr + rc[:, None] * stride_sn + gs[None, :], mask=gm, other=0.0).to(gl.float32)
            mv = gl.load(m_ptr + rc[:, None] * stride_mn + gs[None, :], mask=gm, other=0.0).to(gl.float32)
            gx = (st // 8) * 8 + g_x
            xx = gl.load(x_ptr + gx[:, None] * 64 + i_x[None, :], mask=(gx < NG)[:, None], other=0.0)
            xs = gl.convert_layout(gl.sum(xx.to(gl.float32), axis=1), gl.SliceLayout(0, MMA))
            out += gl.sum(sv * (acc - 128.0 * xs[None, :]) + mv * xs[None, :], axis=1)
            acc = gl.zeros([BN, 8], gl.float32, layout=MMA)
    gl.store(out_ptr + r_c, out, mask=r_c < N)


_block = KERNEL = None
if gluon is not None:
    _block = gluon.jit(_block_fn)
    KERNEL = gluon.jit(_kernel)
PAIR = "{ .reg .b32 t; shr.b32 t, $1, $3; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xEA; }"


def _check(w) -> None:
    n, k = w.matrix
    if w.fmt != "q4" or w.group != GROUP or k % GROUP or w.lead:
        raise ValueError(f"the probe takes one q4 matrix with groups of {GROUP} and K a multiple of it; got "
                         f"{w.fmt}, group {w.group}, shape {tuple(w.matrix)}")


def matvec(x, w, bn: int = 128, persist: int = 0):
    """x [K] bf16 (CUDA), w one q4 QuantWeight [N, K] -> y [N] fp32 through the Gluon kernel; persist P: at most P
    programs a SM, each looping over blocks (0: a program a block)."""
    from tiered.kernels import quant_moe as qm

    _check(w)
    n, k = w.matrix
    codes = qm._codes(w, 2)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    blocks = triton.cdiv(n, bn)
    grid = min(blocks, persist * torch.cuda.get_device_properties(x.device).multi_processor_count) if persist \
        else blocks
    KERNEL[(grid,)](x, codes, w.scale, w.min, out, n, codes.stride(0), w.scale.stride(0), w.min.stride(0), KW=k // 8,
                    NG=k // GROUP, BN=bn, PAIR=PAIR, PERSIST=bool(persist), **layouts(bn), num_warps=4)
    return out


def emulate(x, w):
    """The kernel's logical computation in torch (CPU): the same word, nibble and x indices, the 8-group
    accumulator with its 128 offset and the epilogue; fp64 sums. Checks the index math without a GPU."""
    from tiered.kernels import quant_moe as qm

    _check(w)
    n, k = w.matrix
    words = qm._codes(w, 2).long() & 0xFFFFFFFF  # [N, KW]
    xs = x.double()
    s, m = w.scale.double(), w.min.double()
    kk = torch.arange(64)
    h, t, lo = kk // 32, (kk // 8) % 4, kk % 8
    word = 2 * t + h  # the word of each K position in a step
    nib = lo // 2 + 4 * (lo % 2)  # l = 2i + e holds stored nibble i + 4e
    out = torch.zeros(n, dtype=torch.float64)
    acc = torch.zeros(n, 8, dtype=torch.float64)
    steps = k // GROUP
    for st in range(steps):
        a = 128 + ((words[:, st * 8 + word] >> (4 * nib)) & 0xF)  # [N, 64]
        b = torch.zeros(64, 8, dtype=torch.float64)
        b[:, st % 8] = xs[st * 64 + 8 * word + nib]  # B's column for this group: x at the same stored inputs
        acc += a.double() @ b
        if st % 8 == 7 or st == steps - 1:
            g = (st // 8) * 8 + torch.arange(8)
            ok = g < steps
            gsum = torch.zeros(8, dtype=torch.float64)
            gsum[ok] = xs.view(steps, GROUP)[g[ok]].sum(1)
            sv = torch.zeros(n, 8, dtype=torch.float64)
            mv = torch.zeros(n, 8, dtype=torch.float64)
            sv[:, ok], mv[:, ok] = s[:, g[ok]], m[:, g[ok]]
            out += (sv * (acc - 128 * gsum) + mv * gsum).sum(1)
            acc.zero_()
    return out


def cpu_check(seed: int = 0) -> dict:
    """emulate against quant_matvec_ref on small q4 matrices (K of 1, 8 and 11 groups: a partial epilogue)."""
    from tiered.kernels.quant_moe import quant_matvec_ref
    from tiered.layout.quant import quantize

    g = torch.Generator().manual_seed(seed)
    res = {}
    for n, k in ((48, 64), (33, 512), (70, 704)):
        w = quantize(torch.randn(n, k, generator=g) * k ** -0.5, "q4")
        x = torch.randn(k, generator=g).to(torch.bfloat16)
        ref = quant_matvec_ref(x.float()[None], w)[0].double()
        err = float((emulate(x, w) - ref).norm() / ref.norm())
        res[f"{n}x{k}"] = err
        if err > 1e-6:
            raise SystemExit(f"the emulated index math misses the reference at {n}x{k}: relative error {err:.2e}")
    return res


def sass_counts(k: int = 2048) -> list[dict]:
    """Static SASS of one program for sm_90 at BN 64, 128, 256 (no GPU: Triton's ptxas and cuobjdump)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernel_regs import cuobjdump, sass_ops

    rows = []
    for bn in (64, 128, 256):
        cst = {"KW": k // 8, "NG": k // GROUP, "BN": bn, "PAIR": PAIR, "PERSIST": False, **layouts(bn)}
        sig = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*bf16", "m_ptr": "*bf16", "out_ptr": "*fp32", "N": "i32",
               "stride_qn": "i32", "stride_sn": "i32", "stride_mn": "i32", **{c: "constexpr" for c in cst}}
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(9) if i != 5}
        kern = triton.compile(GluonASTSource(KERNEL, sig, cst, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
        ops = sass_ops(kern.asm["cubin"])
        total = sum(ops.values())
        usage = cuobjdump(kern.asm["cubin"], "-res-usage")
        regs = next((w for line in usage.splitlines() for w in line.split() if w.startswith("REG")), "")
        rows.append({"bn": bn, "instructions": total, "per_input": total / (bn * k / 128), "registers": regs,
                     "top": dict(ops.most_common(8)), "shared_stores": ops.get("STS", 0)})
    return rows


def gpu_run(bns: list[int], persists: list[int]) -> dict:
    """On CUDA: each BN against quant_matvec_ref (fp32 outputs), then timed in CUDA graphs of calls on other copies
    of the matrix against TUNED's quant_matvec (PDL as the engine launches it, and without)."""
    from bench_moe_kernels import rel, time_graph

    from tiered.kernels import quant_moe as qm
    from tiered.layout.quant import quantize

    out = {}
    for name, (n, k) in DENSE.items():
        g = torch.Generator(device="cuda").manual_seed(n)
        copies = 2 if n * k > 1e8 else 8
        mats = [quantize(torch.randn(n, k, generator=g, device="cuda") * k ** -0.5, "q4") for _ in range(copies)]
        x = torch.randn(k, generator=g, device="cuda").to(torch.bfloat16)
        ref = qm.quant_matvec_ref(x.float()[None], mats[0])[0]
        row = {"shape": [n, k], "bytes": mats[0].nbytes}
        t = time_graph([lambda m=m: qm.quant_matvec(x[None], m) for m in mats], reps=20)
        row["tuned_pdl_us"] = t * 1e6
        os.environ["TIERED_PDL"] = "0"
        try:
            row["tuned_nopdl_us"] = time_graph([lambda m=m: qm.quant_matvec(x[None], m) for m in mats], reps=20) * 1e6
        finally:
            os.environ.pop("TIERED_PDL")
        for bn in bns:
            for pp in persists:
                r = {"rel_err": rel(matvec(x, mats[0], bn, pp), ref.float())}
                if r["rel_err"] <= 1e-4:
                    r["us"] = time_graph([lambda m=m: matvec(x, m, bn, pp) for m in mats], reps=20) * 1e6
                    r["tbps"] = mats[0].nbytes / r["us"] / 1e6
                    r["vs_tuned_nopdl"] = row["tuned_nopdl_us"] / r["us"]
                row[f"bn{bn}_p{pp}"] = r
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="check and time the kernel on this machine's GPU")
    ap.add_argument("--bn", default="64,128,256", help="rows a program to try with --gpu")
    ap.add_argument("--persist", default="0,4", help="programs a SM looping over blocks to try (0: a program a block)")
    args = ap.parse_args()
    if gluon is None:
        sys.exit(f"this Triton ({getattr(triton, '__version__', 'absent')}) has no Gluon")
    res = {"triton": triton.__version__, "date": time.strftime("%Y-%m-%d"), "cpu_check": cpu_check()}
    print("emulated index math against quant_matvec_ref (relative error):", res["cpu_check"])
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs CUDA")
        from benchmeta import git_commit, write_out

        res.update(device=torch.cuda.get_device_name(), commit=git_commit(),
                   products=gpu_run([int(b) for b in args.bn.split(",")], [int(v) for v in args.persist.split(",")]))
        print(write_out(res, "gluon_q4.json"))
        return
    res["sass"] = sass_counts()
    for r in res["sass"]:
        print(f"BN {r['bn']:3d}: {r['instructions']} SASS, {r['per_input']:.2f} an input, {r['registers']}, "
              f"STS {r['shared_stores']}; {r['top']}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
