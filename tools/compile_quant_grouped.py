"""Compile the grouped dequantizing MoE kernels (tiered/kernels/quant_grouped.py) for a CUDA target without a GPU.

    python3 tools/compile_quant_grouped.py [--quick] [--arch 90]

Triton's interpreter (the CPU tests) accepts code the real compiler rejects (casts, layouts, bit widths); this
runs the whole pipeline (ttir, ttgir, llir, ptx, cubin through the bundled ptxas) for the three kernels
(grouped gate/up and down, each also with gpt-oss's biases and clamped SwiGLU, the dense quant_matmul) in every
format at the 10.6B expert shape, as the runtime's tile configs instantiate them. Run it with TRITON_INTERPRET
unset. Prints one line per (format, tiles): "FMT tiles ok" or the compiler's error; exits 1 on any error and 3
when this Triton has no NVIDIA backend or ptxas (nothing checked).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# format -> (code pointer type, scale pointer type)
TYPES = {"q8": ("*i8", "*bf16"), "q4": ("*u8", "*bf16"), "fp8": ("*fp8e4nv", "*fp32"), "mxfp4": ("*u8", "*u8")}
STRIDES = dict(num_rows="i32", sq0="i64", sq1="i32", ss0="i64", ss1="i32", sm0="i64", sm1="i32")
# gpt-oss's expert biases and clamped SwiGLU (placeholders when HAS_BIAS is off)
BIAS_GU = dict(gb_ptr="*bf16", ub_ptr="*bf16", stride_bs="i32", alpha="fp32", limit="fp32")
BIAS_D = dict(db_ptr="*bf16", stride_bs="i32")
SCALARS = ("num_rows", "T", "alpha", "limit")  # no divisibility hint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one tile config per format (steps over several groups)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--stats", action="store_true", help="also count MMA and load instructions in the PTX")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to compile")
        return 2
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import triton.backends.nvidia as nv
        ptxas = Path(nv.__file__).parent / "bin" / "ptxas"
        if not ptxas.exists() and not os.environ.get("TRITON_PTXAS_PATH"):
            raise ImportError(f"no ptxas at {ptxas}")
    except ImportError as e:
        print(f"skipped: this Triton cannot compile for CUDA here ({e})")
        return 3
    import torch

    from tiered.kernels import quant_grouped as qg
    from tiered.kernels.moe_grouped import GroupedConfig
    from tiered.layout.quant import quantize

    target = GPUTarget("cuda", a.arch, 32)
    D, Fe, K = 2048, 768, 8
    # (block_m, block_n, block_k, warps, stages): the runtime's picks for few and many rows per expert, and a
    # step over several groups
    # (block_m, block_n, block_k, warps, stages, swap, ps): swap 1-3, the transposed products for few rows an expert;
    # 4 / 5, the weight tile interleaved back into input order (the picks above 16 rows an expert); ps 1, the next
    # step's scales loaded during this one (GroupedConfig.ps)
    tiles = ([(16, 64, 128, 4, 4, 0, 0), (16, 64, 128, 4, 4, 3, 0), (128, 64, 64, 4, 4, 5, 1),
              (16, 64, 128, 4, 4, 0, 1)] if a.quick else
             [(16, 64, 128, 4, 4, 0, 0), (64, 64, 64, 4, 4, 0, 0), (128, 128, 64, 8, 3, 0, 0),
              (128, 64, 64, 4, 4, 0, 0), (16, 64, 64, 4, 4, 1, 0), (16, 64, 64, 4, 4, 2, 0), (16, 128, 64, 4, 4, 3, 0),
              (64, 64, 64, 4, 4, 4, 0), (128, 64, 64, 4, 4, 5, 0), (16, 64, 128, 4, 4, 0, 1), (16, 64, 64, 4, 4, 1, 1),
              (64, 64, 64, 4, 4, 4, 1), (128, 64, 64, 4, 4, 5, 1)])
    failed = 0
    for fmt, (qt, st) in TYPES.items():
        # one matrix of each orientation gives the geometry (groups, packed width) the launcher derives
        gate = quantize(torch.zeros(1, Fe, D), fmt)
        down = quantize(torch.zeros(1, D, Fe), fmt)
        for bm, bn, bk, warps, stages, swap, ps in tiles:
            t0 = time.perf_counter()
            try:
                for fn, w, types, extra in (
                        (qg._qgrouped_gate_up_kernel, gate,
                         dict(x_ptr="*bf16", rows_ptr="*i32", bslot_ptr="*i64", gq=qt, gs=st, gm=st, uq=qt, us=st,
                              um=st, h_ptr="*bf16", stride_xt="i32", **STRIDES, **BIAS_GU), dict(D=D, F=Fe, K=K)),
                        (qg._qgrouped_gate_up_kernel, gate,
                         dict(x_ptr="*bf16", rows_ptr="*i32", bslot_ptr="*i64", gq=qt, gs=st, gm=st, uq=qt, us=st,
                              um=st, h_ptr="*bf16", stride_xt="i32", **STRIDES, **BIAS_GU),
                         dict(D=D, F=Fe, K=K, ACT=1, HAS_BIAS=True)),  # gpt-oss: biases, the clamped SwiGLU
                        (qg._qgrouped_down_kernel, down,
                         dict(h_ptr="*bf16", rows_ptr="*i32", bslot_ptr="*i64", wt_ptr="*bf16", dq=qt, ds=st, dm=st,
                              out_ptr="*bf16", **STRIDES, **BIAS_D), dict(D=D, F=Fe)),
                        (qg._qgrouped_down_kernel, down,
                         dict(h_ptr="*bf16", rows_ptr="*i32", bslot_ptr="*i64", wt_ptr="*bf16", dq=qt, ds=st, dm=st,
                              out_ptr="*bf16", **STRIDES, **BIAS_D), dict(D=D, F=Fe, HAS_BIAS=True)),
                        (qg._qmatmul_kernel, gate,
                         dict(x_ptr="*bf16", q=qt, s=st, m=st, out_ptr="*bf16", T="i32", stride_xt="i32",
                              stride_ot="i32", sq1="i32", ss1="i32", sm1="i32", KSPLIT="i32"), dict(N=Fe, KIN=D)),
                        (qg._split_sum_kernel, None, dict(part_ptr="*fp32", out_ptr="*bf16", numel="i32"),
                         dict(SPLITS=4, BLOCK=qg.SUM_BLOCK))):
                    if w is None:  # the split-K sum: no weight geometry
                        consts = extra
                        sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
                        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                                 if sig[n] != "constexpr" and n != "numel"}
                        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=dict(num_warps=4))
                        if "cubin" not in k.asm:
                            raise RuntimeError("no cubin produced")
                        continue
                    geo = qg._geometry(w, qg._step(w, GroupedConfig(bm, bn, bk, warps, stages, swap=swap)))
                    if fmt == "fp8":
                        geo["WFMT"] = qg.WFMT["fp8"]  # the CUDA branch (the zeros above sit on the CPU)
                    consts = dict(extra, **geo, BLOCK_M=bm, BLOCK_N=bn, PREC="tf32")
                    if "SWAP" in fn.arg_names:
                        consts["SWAP"] = swap if fn is not qg._qmatmul_kernel or swap in (0, 4, 5) else 0
                    if "PS" in fn.arg_names:
                        consts["PS"] = ps if fn is not qg._qmatmul_kernel or swap in (0, 4, 5) else 0
                    for name, default in (("ACT", 0), ("HAS_BIAS", False), ("DQ", 0)):
                        if name in fn.arg_names:
                            consts.setdefault(name, default)
                    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
                    # what the launcher's specialization sees: pointers and strides divisible by 16
                    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                             if sig[n] != "constexpr" and n not in SCALARS}
                    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                                       options=dict(num_warps=warps, num_stages=stages))
                    if "cubin" not in k.asm:
                        raise RuntimeError("no cubin produced")
                    if a.stats:
                        ptx = k.asm["ptx"]
                        print(f"  {fn.__name__}: wgmma {ptx.count('wgmma.mma_async')}, mma.sync "
                              f"{ptx.count('mma.sync')}, ld.global {ptx.count('ld.global')} (vector "
                              f"{ptx.count('ld.global.v')}), cp.async {ptx.count('cp.async')}, shared "
                              f"{k.metadata.shared} B")
                print(f"{fmt} bm{bm} bn{bn} bk{bk} swap{swap} ps{ps} R{geo['R']} ok {time.perf_counter() - t0:.1f}s",
                      flush=True)
            except Exception as e:  # report every format, then fail
                failed += 1
                print(f"{fmt} bm{bm} bn{bn} bk{bk} swap{swap} ps{ps} FAILED {type(e).__name__}: {str(e)[:1500]}",
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
