"""Fused dequantize-and-multiply for quantized weights (q8, q4, mxfp4): decode-sized products that read the
packed codes and scales in place, so no dense copy of a quantized weight is made on the hot path.

Owns: the Triton kernel `_qmv_kernel` (out[t] = x[t] @ W[slot[t]]^T, W read from its stored parts, the
format a constexpr), its launcher `quant_matvec`, the reference `quant_matvec_ref` (dequantize then matmul,
tiered/layout/quant.py), and the two callers the model uses: `qlinear` (a dense matrix, quantized or not)
and `experts_quant_decode` (one token's K quantized experts, SwiGLU, weighted sum).
Does not own: the formats or their reference dequantization (layout/quant.py), the bf16 MoE kernels.

One program computes BLOCK_N outputs of one row t against one stacked matrix W[slot[t]], streaming the codes
in BLOCK_K-wide tiles; group scales are read per element (groups need not be a power of two: the whole-row
group of a small q4 matrix). Accumulation in fp32. fp8 is not fused (it takes the reference path). Without
CUDA, or on more rows than MAX_ROWS (prefill), the reference path runs: the model dequantizes one expert
or one matrix at a time.

Legend: T rows (tokens, or token x expert pairs), N outputs, K inputs, S stacked matrices (slots).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.layout.quant import QuantWeight, linear as linear_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU runtime does not need Triton
    triton = None

FUSED_FORMATS = {"q8": 0, "q4": 1, "mxfp4": 2}
MAX_ROWS = 16  # above this many rows a dense matmul over the dequantized weight wins
BLOCK_N, BLOCK_K = 32, 128


def kernel_ok(x: Tensor, w: QuantWeight, *, interpret: bool = False) -> bool:
    """Whether the fused kernel serves this product: CUDA (or, for tests, Triton's CPU interpreter when
    `interpret` is passed), a fused format, rows of codes and scales contiguous."""
    return (triton is not None and w.fmt in FUSED_FORMATS and (x.is_cuda or interpret)
            and w.q.stride(-1) == 1 and w.scale.stride(-1) == 1)


@functools.cache
def _qmv_kernel():
    """The kernel, decorated on first use (Triton picks compiled or interpreted at decoration time, so a
    test may switch TRITON_INTERPRET on before the first launch)."""

    @triton.jit
    def qmv(x_ptr, slot_ptr, q_ptr, s_ptr, m_ptr, out_ptr, N, K,
            stride_xt, stride_qs, stride_qn, stride_ss, stride_sn, stride_ms, stride_mn, stride_ot,
            FMT: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        t = tl.program_id(0)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        mask_n = offs_n < N
        slot = tl.load(slot_ptr + t).to(tl.int64)
        q_row = q_ptr + slot * stride_qs + offs_n[:, None].to(tl.int64) * stride_qn
        s_row = s_ptr + slot * stride_ss + offs_n[:, None].to(tl.int64) * stride_sn
        acc = tl.zeros([BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < K
            mask = mask_n[:, None] & mask_k[None, :]
            x = tl.load(x_ptr + t * stride_xt + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            g = (offs_k // GROUP)[None, :]
            s = tl.load(s_row + g, mask=mask, other=0).to(tl.float32)
            if FMT == 0:  # q8: int8 * scale
                w = tl.load(q_row + offs_k[None, :], mask=mask, other=0).to(tl.float32) * s
            else:
                byte = tl.load(q_row + (offs_k // 2)[None, :], mask=mask, other=0).to(tl.int32)
                code = (byte >> ((offs_k % 2) * 4)[None, :]) & 15
                if FMT == 1:  # q4: code * scale + min
                    m_row = m_ptr + slot * stride_ms + offs_n[:, None].to(tl.int64) * stride_mn
                    w = code.to(tl.float32) * s + tl.load(m_row + g, mask=mask, other=0).to(tl.float32)
                else:  # mxfp4: e2m1 code * 2^(e8m0 - 127)
                    e = (code >> 1) & 3
                    mb = (code & 1).to(tl.float32)
                    mag = tl.where(e == 0, 0.5 * mb, tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * mb))
                    w = tl.where((code & 8) != 0, -mag, mag) * tl.exp2(s - 127.0)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(out_ptr + t * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)

    return qmv


def quant_matvec(x: Tensor, w: QuantWeight, slots: Tensor | None = None, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """out [T, N] = x[t] @ W[slot[t]]^T with the fused kernel.

    x [T, K] (a row stride of 0 broadcasts one row); w a single [N, K] matrix (slots None) or a stack
    [S, N, K] with slots int64 [T] on x's device.
    """
    n, k = w.matrix
    T = x.shape[0]
    if not w.lead:
        slots = torch.zeros(T, dtype=torch.int64, device=x.device)
        sq = ss = sm = 0
    else:
        sq, ss = w.q.stride(0), w.scale.stride(0)
        sm = w.min.stride(0) if w.min is not None else 0
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(T, n, dtype=out_dtype or x.dtype, device=x.device)
    m = w.min if w.min is not None else w.scale
    grid = (T, triton.cdiv(n, BLOCK_N))
    _qmv_kernel()[grid](x, slots, w.q, w.scale, m, out, n, k, x.stride(0), sq, w.q.stride(-2), ss,
                      w.scale.stride(-2), sm, m.stride(-2), out.stride(0), FMT=FUSED_FORMATS[w.fmt],
                      GROUP=w.group, BN=BLOCK_N, BK=BLOCK_K)
    return out


def quant_matvec_ref(x: Tensor, w: QuantWeight, slots: Tensor | None = None) -> Tensor:
    """The reference of quant_matvec: each row against its dequantized matrix (fp32), in x's dtype."""
    if not w.lead:
        return F.linear(x.float(), w.dequantize(torch.float32)).to(x.dtype)
    mats = w.index_select(0, slots).dequantize(torch.float32)  # [T, N, K]
    return torch.bmm(mats, x.float()[:, :, None])[:, :, 0].to(x.dtype)


def qlinear(x: Tensor, w: Tensor | QuantWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear over a dense or quantized weight: the fused kernel for a few rows on CUDA, else the
    reference (dequantize into x's dtype, then matmul). x [..., K] -> [..., N]."""
    if not isinstance(w, QuantWeight):
        return F.linear(x, w, bias)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS or not kernel_ok(x, w):
        return linear_ref(x, w, bias)
    y = quant_matvec(rows, w).view(*x.shape[:-1], w.matrix[0])
    return y + bias if bias is not None else y


def experts_quant_decode(x: Tensor, slots: Tensor, weights: Tensor, gate: QuantWeight, up: QuantWeight,
                         down: QuantWeight, *, interpret: bool = False) -> Tensor | None:
    """One token's K experts from quantized stacks, fused dequantization: x [1, D], slots [K] int64,
    weights [1, K] -> [1, D] in x's dtype (each expert's output rounded to it, then weighted and summed, as
    the reference path). None when the kernel cannot serve it (the caller runs the reference)."""
    if not all(kernel_ok(x, w, interpret=interpret) for w in (gate, up, down)):
        return None
    K = slots.shape[0]
    xs = x.expand(K, x.shape[-1])  # [K, D], row stride 0: every expert reads the same input
    h = F.silu(quant_matvec(xs, gate, slots)) * quant_matvec(xs, up, slots)  # [K, F]
    y = quant_matvec(h, down, slots)  # [K, D]
    return (y * weights.view(K, 1)).sum(0, keepdim=True).to(x.dtype)
