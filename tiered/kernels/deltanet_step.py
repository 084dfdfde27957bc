"""The one-token Gated DeltaNet step in two Triton kernels (the decode step of Qwen3.5-MoE / Qwen3-Next layers).

Owns: `_conv_step_kernel` (the depthwise causal conv over the conv state + SiLU for one token, shifting the state in
place) and `_delta_step_kernel` (per value head: q/k L2 norm, the decay g and learning rate beta from their
projections, the gated delta-rule update of the recurrent state in place, the read-out S^T q, and the gated
RMSNorm with silu(z)), and the launcher `deltanet_step`. One call serves B sequences (the batch step's rows): row b
continues from its own conv and recurrent states.
Does not own: the projections around the step (the model's linears), the multi-token forms (fla's chunked kernel or
the torch forms in model/deltanet.py, which are also this module's reference: `deltanet` with the torch backend).

Why: the same step written as torch ops is ~25 small kernels per layer (cat, casts, conv1d, silu, softplus, exp,
repeat_interleave, the recurrence, a state copy-back, the gated norm), and a one-token step is bound by their launch
latency, not by bytes (a 35B-shape layer's state is 2 MiB). Here it is two launches.

Roundings follow the torch path (model/deltanet.py) so the kernels and the reference agree to fp32 summation order:
the conv accumulates in fp32 and rounds to the weight's dtype, SiLU rounds to the compute dtype; beta is rounded to
the compute dtype (the sigmoid of a compute-dtype projection); g, the state and the recurrence are fp32; the
read-out is rounded to the compute dtype before the gated norm, which normalises in fp32, rounds, scales by the
weight (rounded), multiplies by silu(z) in fp32 and rounds once more.

Legend: B sequences (rows), C conv channels (2*Hk*dk + Hv*dv), W conv kernel, Hk key heads, Hv value heads
(G = Hv / Hk value heads per key head), dk key head dim, dv value head dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

CONV_BLOCK = 256  # channels per conv program
DELTA_BV = 32  # value columns per step of a recurrence program (each program loops over dv)


@triton.jit
def _conv_step_kernel(x_ptr, w_ptr, st_ptr, out_ptr, C, x_stride,
                      W: tl.constexpr, BLOCK: tl.constexpr):
    """x [B, C] this token (before the conv; rows x_stride apart), w [C, W], st [B, C, W-1] (updated) -> out [B, C]
    silu(conv)."""
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    wdt = w_ptr.dtype.element_ty
    x = tl.load(x_ptr + b * x_stride + c, mask=m, other=0.0).to(wdt)
    acc = x.to(tl.float32) * tl.load(w_ptr + c * W + (W - 1), mask=m, other=0.0).to(tl.float32)
    srow = st_ptr + (b * C + c) * (W - 1)
    for j in tl.static_range(W - 1):
        prev = tl.load(srow + j, mask=m, other=0.0).to(wdt)
        acc += prev.to(tl.float32) * tl.load(w_ptr + c * W + j, mask=m, other=0.0).to(tl.float32)
    # shift the state left (slot j takes slot j + 1's input), then the newest input last; each thread owns the same
    # channels in every load and store of this program, so a slot is read before it is overwritten
    for j in tl.static_range(W - 2):
        tl.store(srow + j, tl.load(srow + (j + 1), mask=m, other=0.0), mask=m)
    tl.store(srow + (W - 2), x.to(st_ptr.dtype.element_ty), mask=m)
    y = acc.to(wdt).to(tl.float32)
    y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + b * C + c, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _delta_step_kernel(qkv_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, s_ptr, z_ptr, nw_ptr, out_ptr,
                       C, Hv, Kd, ab_stride, z_stride, q_scale, eps,
                       G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """One (row, value head): qkv [B, C] after the conv, a/b [B, Hv] (rows ab_stride apart), s [B, Hv, DK, DV] fp32
    (updated), z [B, Hv*DV] (rows z_stride apart) -> out [B, Hv*DV] = gated_rms_norm(S^T q, nw, z)."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    kh = h // G
    dt = out_ptr.dtype.element_ty
    rk = tl.arange(0, BK)
    mk = rk < DK
    base = qkv_ptr + row * C
    q = tl.load(base + kh * DK + rk, mask=mk, other=0.0).to(tl.float32)
    k = tl.load(base + Kd + kh * DK + rk, mask=mk, other=0.0).to(tl.float32)
    q = q * (1.0 / tl.sqrt(tl.sum(q * q, axis=0) + 1e-6)) * q_scale
    k = k * (1.0 / tl.sqrt(tl.sum(k * k, axis=0) + 1e-6))
    a = tl.load(a_ptr + row * ab_stride + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    sp = tl.where(a > 20.0, a, tl.log(1.0 + tl.exp(tl.minimum(a, 20.0))))  # softplus (torch's threshold 20)
    decay = tl.exp(-tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * sp)  # exp(g), g <= 0
    bl = tl.load(b_ptr + row * ab_stride + h).to(tl.float32)
    beta = (1.0 / (1.0 + tl.exp(-bl))).to(dt).to(tl.float32)
    srow = s_ptr + (row * Hv + h) * DK * DV
    vbase = base + 2 * Kd + h * DV
    obase = out_ptr + row * Hv * DV + h * DV
    ss = 0.0
    for v0 in tl.static_range(0, DV, BV):  # the dv columns are independent in the delta rule
        rv = v0 + tl.arange(0, BV)
        mv = rv < DV
        m2 = mk[:, None] & mv[None, :]
        ptrs = srow + rk[:, None] * DV + rv[None, :]
        S = tl.load(ptrs, mask=m2, other=0.0) * decay  # [BK, BV]
        v = tl.load(vbase + rv, mask=mv, other=0.0).to(tl.float32)
        kv = tl.sum(S * k[:, None], axis=0)  # what the state predicts for k
        delta = (v - kv) * beta
        S = S + k[:, None] * delta[None, :]
        tl.store(ptrs, S, mask=m2)
        o = tl.sum(S * q[:, None], axis=0).to(dt).to(tl.float32)  # the read-out, rounded as the torch path does
        o = tl.where(mv, o, 0.0)
        ss += tl.sum(o * o, axis=0)
        tl.store(obase + rv, o.to(dt), mask=mv)
    inv = 1.0 / tl.sqrt(ss / DV + eps)
    tl.debug_barrier()  # the second pass reads back this program's own rounded read-out
    for v0 in tl.static_range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        mv = rv < DV
        o = tl.load(obase + rv, mask=mv, other=0.0).to(tl.float32)
        y = (o * inv).to(dt).to(tl.float32)
        y = (y * tl.load(nw_ptr + rv, mask=mv, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
        z = tl.load(z_ptr + row * z_stride + h * DV + rv, mask=mv, other=0.0).to(tl.float32)
        tl.store(obase + rv, (y * (z / (1.0 + tl.exp(-z)))).to(dt), mask=mv)


def deltanet_step(qkv: Tensor, conv_w: Tensor, conv_state: Tensor, a: Tensor, b: Tensor, A_log: Tensor,
                  dt_bias: Tensor, state: Tensor, z: Tensor, norm_w: Tensor, *, num_k_heads: int, eps: float) -> Tensor:
    """One token of B sequences through a Gated DeltaNet layer's mixer, after its projections.

    qkv [B, C] (the in_proj_qkv output, before the conv), conv_w [C, W], conv_state [B, C, W-1] (updated), a, b
    [B, Hv] (the decay and beta projections), A_log [Hv] fp32, dt_bias [Hv], state [B, Hv, dk, dv] fp32 (updated),
    z [B, Hv*dv] (the output gate projection), norm_w [dv] -> [B, Hv*dv] in qkv's dtype (before out_proj).
    The states must be contiguous: they are updated in place. qkv, a, b and z may be column slices of one stacked
    projection's output (unit column stride; a and b share their row stride).
    """
    B, C = qkv.shape
    W = conv_w.shape[1]
    _, Hv, dk, dv = state.shape
    Hk = num_k_heads
    if Hv % Hk or C != 2 * Hk * dk + Hv * dv:
        raise ValueError(f"deltanet_step: C={C} is not 2*Hk*dk + Hv*dv for Hk={Hk}, Hv={Hv}, dk={dk}, dv={dv}")
    if not (conv_state.is_contiguous() and state.is_contiguous()):
        raise ValueError("deltanet_step updates the conv and recurrent states in place: pass contiguous tensors")
    if conv_state.shape != (B, C, W - 1) or W < 2:
        raise ValueError(f"deltanet_step: conv_state {tuple(conv_state.shape)} is not [B={B}, C={C}, W-1={W - 1}]")
    qkv, z = (t if t.stride(-1) == 1 else t.contiguous() for t in (qkv, z))
    if a.stride(-1) != 1 or b.stride(-1) != 1 or a.stride(0) != b.stride(0):
        a, b = a.contiguous(), b.contiguous()
    conv = torch.empty(B, C, dtype=qkv.dtype, device=qkv.device)
    _conv_step_kernel[(B, triton.cdiv(C, CONV_BLOCK))](qkv, conv_w.contiguous(), conv_state, conv, C, qkv.stride(0),
                                                      W=W, BLOCK=CONV_BLOCK, num_warps=4)
    out = torch.empty(B, Hv * dv, dtype=qkv.dtype, device=qkv.device)
    _delta_step_kernel[(B, Hv)](conv, a, b, A_log, dt_bias, state, z, norm_w, out, C, Hv, Hk * dk,
                                a.stride(0), z.stride(0),
                                float(dk) ** -0.5, float(eps), G=Hv // Hk, DK=dk, DV=dv,
                                BK=triton.next_power_of_2(dk), BV=min(DELTA_BV, triton.next_power_of_2(dv)),
                                num_warps=4)
    return out
