"""RMSNorm of the residual stream, optionally fused with the residual add before it: one Triton launch per call.

Owns: `add_rms_norm(h, delta, weight, eps)` -> (h + delta, rms_norm(h + delta, weight)) and, with delta None,
the plain norm (h returned as is); `interpreted()` (the kernels were built for Triton's interpreter: CPU tensors);
the small helpers other kernels share: `round_weight` / `weight_rounding` (a routing weight rounded as a cast to
the compute dtype would), and as plain functions for the expert kernels to decorate, `act_fn` (SwiGLU or gpt-oss's
clamped form) and `bias_sum_fn` (the down biases' weighted sum).
Does not own: the torch reference (model/layers.py `rms_norm`, which the CPU path keeps and the tests compare
with), the per-head q/k norms (kernels/fused_rope.py), nor where the model calls it (model/transformer.py).

Roundings, exactly those of `layers.rms_norm` and torch's add:
    h' = round(h + delta)                         (fp32 sum, rounded once to the compute dtype, as torch does)
    n  = h' * rsqrt(mean(h'^2) + eps)              (fp32)
    weight in the compute dtype: x = round(round(n) * weight)   (cast back, then scaled: transformers' order)
    fp32 weight (zero-centred 1 + w of Qwen3.5, or an fp32 model): x = round(n * weight)
The fp32 sum of squares runs in a different order than torch's reduction, so rstd may differ in its last bit;
everything else is bit for bit.

Legend: T tokens (rows), D hidden.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tiered.kernels.pdl import gdc_enter, launch_args

try:  # the CPU torch wheel does not bring triton; the runtime imports this module only after triton_available
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None


def interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at triton's first import):
    they then run on CPU tensors (the tests)."""
    return _INTERPRETED


def _check_device(t: Tensor, what: str) -> None:
    if t.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(f"{what}: the Triton kernel runs on CPU tensors only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 before triton is first imported); the model's CPU path uses torch")


def _warps(block: int) -> int:
    return 1 if block <= 256 else 2 if block <= 1024 else 4 if block <= 4096 else 8


def add_rms_norm(h: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h, delta [T, D] (compute dtype; delta None = no add), weight [D] (compute dtype or fp32)
    -> (h' = h + delta [T, D] (h itself when delta is None), rms_norm(h', weight) [T, D] in h's dtype)."""
    _check_device(h, "add_rms_norm")
    if h.dim() != 2 or weight.dim() != 1 or weight.shape[0] != h.shape[1]:
        raise ValueError(f"add_rms_norm wants h [T, D] and weight [D]; got {tuple(h.shape)}, {tuple(weight.shape)}")
    if h.stride(-1) != 1:
        h = h.contiguous()
    T, D = h.shape
    x = torch.empty((T, D), dtype=h.dtype, device=h.device)
    if delta is None:
        out, d = h, h
    else:
        if delta.shape != h.shape:
            raise ValueError(f"add_rms_norm: delta {tuple(delta.shape)} does not match h {tuple(h.shape)}")
        d = delta if delta.stride(-1) == 1 else delta.contiguous()
        out = torch.empty((T, D), dtype=h.dtype, device=h.device)
    if T == 0:
        return out, x
    w = weight if weight.stride(0) == 1 else weight.contiguous()
    block = triton.next_power_of_2(D)
    _ADD_NORM[(T,)](h, d, w, out, x, D, float(eps), h.stride(0), d.stride(0), out.stride(0), x.stride(0),
                    BLOCK=block, ADD=delta is not None, W32=w.dtype == torch.float32, num_warps=_warps(block),
                    **launch_args(h.device))
    return out, x


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The plain norm of x [T, D] (layers.rms_norm's roundings), one launch."""
    return add_rms_norm(x, None, weight, eps)[1]


# --- kernel (plain functions, wrapped by triton.jit below: compiled, or interpreted on CPU) ---

def _round_to(x, dtype: tl.constexpr):
    """x (fp32) rounded to nearest-even in `dtype`, as torch's casts round. bf16 is rounded with integer ops
    (add 0x7fff plus the lowest kept bit, drop 16 bits): compiled, a plain cast does the same, but Triton's
    interpreter truncates, which the CPU tests would see. (NaN inputs are not preserved; none occur here.)"""
    if dtype == tl.float32:
        return x
    elif dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


def weight_rounding(dtype: torch.dtype | None) -> int:
    """The WR constexpr of the expert kernels (moe_decode.py, quant_moe.py): routing weights arrive in fp32 and are
    rounded to `dtype` inside the kernel (what a torch cast to the compute dtype would give); None or fp32: as
    given."""
    codes = {None: 0, torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    if dtype not in codes:
        raise ValueError(f"routing weights cannot be rounded to {dtype} in the expert kernels")
    return codes[dtype]


def _round_weight(w, WR: tl.constexpr):
    """w (fp32) rounded as `weight_rounding` says (WR 0: unchanged), back in fp32."""
    if WR == 1:
        w = _round_to(w, tl.bfloat16).to(tl.float32)
    elif WR == 2:
        w = _round_to(w, tl.float16).to(tl.float32)
    return w


def _add_norm_kernel(H, DELTA, W, HOUT, X, D, eps, s_h, s_d, s_ho, s_x,
                     BLOCK: tl.constexpr, ADD: tl.constexpr, W32: tl.constexpr, GDC: tl.constexpr = False):
    gdc_enter(GDC)
    t = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK)
    m = o < D
    h = tl.load(H + t * s_h + o, mask=m, other=0.0)
    if ADD:
        d = tl.load(DELTA + t * s_d + o, mask=m, other=0.0)
        h = _round_to(h.to(tl.float32) + d.to(tl.float32), HOUT.dtype.element_ty)  # torch's add: one rounding
        tl.store(HOUT + t * s_ho + o, h, mask=m)
    hf = h.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(hf * hf, axis=0) / D + eps)
    n = hf * rstd
    w = tl.load(W + o, mask=m, other=0.0).to(tl.float32)
    if W32:  # fp32 scale: multiplied in fp32, one cast (zero-centred norms; every fp32 model)
        y = n * w
    else:  # cast back to the compute dtype, then scaled (the product rounded once)
        y = _round_to(n, X.dtype.element_ty).to(tl.float32) * w
    tl.store(X + t * s_x + o, _round_to(y, X.dtype.element_ty), mask=m)


# shared by the expert kernels (moe_decode.py, quant_moe.py), which decorate them in their own mode
def act_fn(g, u, ACT: tl.constexpr, alpha=1.702, limit=7.0):
    """The gated activation in fp32. ACT 0 (SWIGLU): silu(g) * u; 1 (SWIGLU_CLAMP, gpt-oss): g clamped above at
    limit, u to [-limit, limit], g * sigmoid(alpha g) * (u + 1). A plain function: moe_decode.py and
    quant_moe.py decorate it."""
    if ACT == 1:
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return g * tl.sigmoid(g * alpha) * (u + 1.0)
    return g * tl.sigmoid(g) * u


def bias_sum_fn(b_ptr, slot_ptr, wt_ptr, t, offs, mask, slot_base, stride_bs, K: tl.constexpr, KP: tl.constexpr,
                WR: tl.constexpr):
    """[len(offs)] fp32: sum over token t's K experts of w_k * bias[slot_k][offs] (the down biases' share of the
    MoE output, with the same weight rounding as the experts' products). A plain function: moe_decode.py and
    quant_moe.py decorate it."""
    ko = tl.arange(0, KP)
    mk = ko < K
    slot = tl.load(slot_ptr + t * K + ko, mask=mk, other=0).to(tl.int64) + slot_base
    w = round_weight(tl.load(wt_ptr + t * K + ko, mask=mk, other=0).to(tl.float32), WR)
    b = tl.load(b_ptr + slot[:, None] * stride_bs + offs[None, :], mask=mk[:, None] & mask[None, :], other=0.0)
    return tl.sum(b.to(tl.float32) * w[:, None], axis=0)


_INTERPRETED = False
_ADD_NORM = None
round_weight = None
if triton is not None:
    _round_to = triton.jit(_round_to)
    round_weight = triton.jit(_round_weight)
    _ADD_NORM = triton.jit(_add_norm_kernel)
    _INTERPRETED = type(_ADD_NORM).__name__ == "InterpretedFunction"
