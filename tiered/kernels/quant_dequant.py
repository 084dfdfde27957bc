"""Dense copies of quantized matrices for the many-row end of qlinear: a Triton kernel that writes
dequantize(w) in the compute dtype (every format; qlinear takes it for q4 and q8, the dense formats), and
`dequant_matmul`, which multiplies through cuBLAS over that copy in slices of at most `max_scratch` bytes.

Owns: `_dequant_kernel`, `dequant_ok`, `dequantize_rows` and `dequant_matmul`.
Does not own: the formats and their reference dequantization (layout/quant.py, which this kernel equals up to
fp32 rounding before the one rounding to the dtype: the kernel may fuse code * scale + min into one FMA), the
fused tile-by-tile GEMM (quant_grouped.quant_matmul), the choice between the two (quant_moe.qlinear).

Why: the fused GEMM dequantizes each weight tile once per row block, so it runs at a third to a half of cuBLAS's bf16
rate (session 24, call C: the 10.6B lm_head at 2,048 rows 3.4 ms at its best tile against 1.7 ms). A dense copy costs
one pass over the matrix (read the codes, write 2 bytes an input), then runs at cuBLAS's rate. Until session 34 the
copy's kernel loaded a scale (and a minimum) for every input and ran at 0.5-1.0 TB/s (qkv 28-30 us), so qlinear took
it only from 2,048 rows. It now reads quant_grouped's weight tile (`_wtile`: the R groups' scales once a row,
broadcast over each group), every format: session 34's call C, q4, the 10.6B qkv in 8.3 us and the lm_head in 279 us
(about 3 TB/s of bytes moved; the block (16, 256, 4) within 10% of the best of ten at each matrix), so the copy
+ cuBLAS beats the fused GEMM from 128 rows where the copy is one slice (qkv 15.3 against 24.4 us) and from 300 rows
for the lm_head (639 against 1,050): quant_moe.dequant_rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from tiered.kernels.quant_grouped import _codes, _geometry, _wtile
from tiered.kernels.quant_moe import DEQUANT_SCRATCH
from tiered.layout.quant import QuantWeight

DEQUANT_FORMATS = ("q4", "q8")


@triton.jit
def _dequant_kernel(q, s, m, out, n0, rows, sq1, ss1, sm1, KIN: tl.constexpr, KQ: tl.constexpr, NG: tl.constexpr,
                    GROUP: tl.constexpr, ROWBLK: tl.constexpr, WFMT: tl.constexpr, R: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(rows, BLOCK_N), cdiv(KIN, BLOCK_K)): out[r, k] = the value of input k of row n0 + r, for r < rows,
    in out's dtype: quant_grouped's weight tile (`_wtile`: the codes of a [BLOCK_N, BLOCK_K] tile, its R groups'
    scales (and q4's minimums) loaded once a row and broadcast over each group, code * scale + min in fp32, one
    rounding), stored as it comes."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < rows
    n64 = (n0 + rn).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    w = _wtile(q + n64 * sq1, s + (n64 // ROWBLK) * ss1, m + n64 * sm1, mask_n, k0, KQ, NG, GROUP, WFMT, R, BLOCK_K,
               BLOCK_N, out.dtype.element_ty)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out + rn.to(tl.int64)[:, None] * KIN + offs_k[None, :], w,
             mask=mask_n[:, None] & (offs_k < KIN)[None, :])


def dequant_ok(x: Tensor, w: QuantWeight, *, interpret: bool = False) -> bool:
    """Whether this module serves x @ w^T: one q4 or q8 matrix (no stack dims), parts contiguous, x on CUDA (or the
    interpreter, for tests)."""
    return (w.fmt in DEQUANT_FORMATS and not w.lead and (x.is_cuda or interpret)
            and all(t.is_contiguous() for t in w.parts().values()))


DEQUANT_BLOCK = (16, 256, 4)  # BLOCK_N, BLOCK_K, warps: the fastest of six in session 24's call D


def dequantize_rows(w: QuantWeight, n0: int, rows: int, dtype: torch.dtype, out: Tensor | None = None,
                    block: tuple[int, int, int] = DEQUANT_BLOCK) -> Tensor:
    """Rows [n0, n0 + rows) of dequantize(w) as a dense [rows, K] tensor in `dtype` (into `out` when given);
    `block`: the kernel's (BLOCK_N, BLOCK_K, warps)."""
    n, k = w.matrix
    if not 0 <= n0 <= n0 + rows <= n:
        raise ValueError(f"dequantize_rows: rows [{n0}, {n0 + rows}) outside the matrix's {n}")
    out = torch.empty(rows, k, dtype=dtype, device=w.q.device) if out is None else out
    bn, bk, warps = block
    geo = _geometry(w, bk)
    m = w.min if w.min is not None else w.scale
    _dequant_kernel[(triton.cdiv(rows, bn), triton.cdiv(k, geo["BLOCK_K"]))](
        _codes(w), w.scale, m, out, n0, rows, w.q.stride(0), w.scale.stride(0), m.stride(0), KIN=k, **geo,
        BLOCK_N=bn, num_warps=warps)
    return out


def dequant_matmul(x: Tensor, w: QuantWeight, max_scratch: int = DEQUANT_SCRATCH) -> Tensor:
    """x [T, K] @ dequantize(w)^T -> [T, N] in x's dtype through cuBLAS, over dense copies of at most
    `max_scratch` bytes (a matrix above it in slices of rows, each written into its columns of the output).
    The same rounding as the reference (the weight rounded to x's dtype, then the matmul). No host sync."""
    n, k = w.matrix
    per = max(16, min(n, max_scratch // (k * x.element_size())) // 16 * 16)
    if per >= n:
        return F.linear(x, dequantize_rows(w, 0, n, x.dtype))
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    scratch = torch.empty(per, k, dtype=x.dtype, device=x.device)
    for n0 in range(0, n, per):
        r = min(per, n - n0)
        dq = dequantize_rows(w, n0, r, x.dtype, scratch[:r])
        out[:, n0:n0 + r] = F.linear(x, dq)
    return out
