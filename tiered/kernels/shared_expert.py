"""The always-on shared expert's elementwise steps as two Triton kernels (Qwen2-MoE, Qwen3-Next, Qwen3.5-MoE,
DeepSeek-V3).

Owns: `_swiglu_rows_kernel` (the SwiGLU of gate and up read as column slices of one stacked projection's output),
`_gated_add_kernel` (the MoE output plus the shared expert's down projection, scaled by sigmoid of its gate
logit when the family has one) and their launchers `swiglu_rows` and `gated_add`.
Does not own: the GEMVs around them (the model's linears over the stacked [gate; up; expert_gate] matrix and the
down matrix, model/moe.py) nor the reference (model/moe.shared_expert, which the tests compare against).

Why: as torch ops the shared expert is gate, up and gate-logit GEMVs, silu, mul, the down GEMV, sigmoid, mul and
the add into the routed output: nine launches per layer for a few KiB of activations. With the three input
projections stacked it becomes one GEMV, `swiglu_rows`, the down GEMV and `gated_add`: four.

Roundings follow the torch path: silu(g) is rounded to the compute dtype before the product with u, which is rounded;
sigmoid(s) is rounded, its product with the down output is rounded, then the sum with the routed output is rounded.

Legend: T tokens, D hidden, Fs the shared expert's FFN width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _swiglu_rows_kernel(y_ptr, h_ptr, F, y_stride, BLOCK: tl.constexpr):
    """y [T, >= 2F] (gate in columns [0, F), up in [F, 2F); rows y_stride apart) -> h [T, F] = silu(gate) * up."""
    t = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = f < F
    dt = h_ptr.dtype.element_ty
    g = tl.load(y_ptr + t * y_stride + f, mask=m, other=0.0).to(tl.float32)
    u = tl.load(y_ptr + t * y_stride + F + f, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(h_ptr + t * F + f, (s * u).to(dt), mask=m)


@triton.jit
def _gated_add_kernel(out_ptr, d_ptr, s_ptr, res_ptr, D, s_stride, GATED: tl.constexpr, BLOCK: tl.constexpr):
    """res [T, D] = out [T, D] + sigmoid(s[t]) * d [T, D] (GATED; s read at s_ptr + t * s_stride), else out + d."""
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < D
    dt = out_ptr.dtype.element_ty
    d = tl.load(d_ptr + t * D + c, mask=m, other=0.0).to(tl.float32)
    if GATED:
        s = tl.load(s_ptr + t * s_stride).to(tl.float32)
        d = ((1.0 / (1.0 + tl.exp(-s))).to(dt).to(tl.float32) * d).to(dt).to(tl.float32)
    o = tl.load(out_ptr + t * D + c, mask=m, other=0.0).to(tl.float32)
    tl.store(res_ptr + t * D + c, (o + d).to(dt), mask=m)


def swiglu_rows(y: Tensor, F: int) -> Tensor:
    """y [T, N >= 2F] with unit column stride (gate columns [0, F), up [F, 2F)) -> silu(gate) * up [T, F]."""
    if y.stride(-1) != 1:
        y = y.contiguous()
    T = y.shape[0]
    h = torch.empty(T, F, dtype=y.dtype, device=y.device)
    _swiglu_rows_kernel[(T, triton.cdiv(F, BLOCK))](y, h, F, y.stride(0), BLOCK=BLOCK, num_warps=4)
    return h


def gated_add(out: Tensor, d: Tensor, s: Tensor | None) -> Tensor:
    """out [T, D] + sigmoid(s) * d -> a new [T, D]; s [T] or [T, 1] (any row stride), or None for a plain sum."""
    T, D = out.shape
    out, d = out.contiguous(), d.contiguous()
    res = torch.empty_like(out)
    gated = s is not None
    _gated_add_kernel[(T, triton.cdiv(D, BLOCK))](out, d, s if gated else d, res, D, s.stride(0) if gated else 0,
                                                  GATED=gated, BLOCK=BLOCK, num_warps=4)
    return res
