"""Gated DeltaNet (Qwen3.5-MoE / Qwen3-Next linear-attention layers): the token mixer and its fixed-size state.

Owns: `DeltaWeights` (one layer's projections, conv, decay and norm weights), `causal_conv` (depthwise causal
conv1d + SiLU over a rolling conv state), the gated delta rule in its two plain-torch forms
(`chunk_gated_delta_rule` for several tokens, `recurrent_gated_delta_rule` for one token, updating the state
in place), `delta_rule`, the one call site that picks the backend (flash-linear-attention's Triton kernels on
CUDA when `fla` imports, else the torch forms), and `deltanet`, the whole layer.
Does not own: where the state lives (model/state.py allocates it), attention layers (layers.py).

The math follows transformers' `Qwen3_5MoeGatedDeltaNet` (and its torch fallbacks): q and k are L2-normalised in
fp32, q is scaled by dk^-0.5, the state S [Hv, dk, dv] decays by exp(g) per token and learns with the delta
rule S += k (beta (v - S^T k))^T; the output S^T q is RMS-normed per head and gated by silu(z).

`pick_delta_step` chooses the one-token step: the fused Triton kernels of kernels/deltanet_step.py (two launches for
the conv, the recurrence and the gated norm) where the model runs Triton kernels, else the backend's own form.

`deltanet_rows` is the one-token step of B sequences at once (the batch step's decode rows): every head of
every sequence is independent, so the B sequences become B*Hv heads (B*C conv channels) of one call to the same
functions, each row continuing from its own states.

Legend: T tokens, D hidden, C conv channels (2*Hk*dk + Hv*dv), W conv kernel, Hk key heads, Hv value heads,
dk key head dim, dv value head dim, N chunk length.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.kernels import cuda_library_imports
from tiered.kernels.quant_moe import qlinear

CHUNK = 64  # chunk length of the chunked form (fla's and transformers' choice)
BACKENDS = ("auto", "fla", "torch")


@dataclass(frozen=True)
class DeltaWeights:
    qkv: Tensor  # [C, D] in_proj_qkv (q, k, v rows, each head-major); qkv, z and out may be QuantWeights (--dense)
    z: Tensor  # [Hv*dv, D] output gate projection
    b: Tensor  # [Hv, D] beta projection (sigmoid -> learning rate)
    a: Tensor  # [Hv, D] decay projection
    conv: Tensor  # [C, W] depthwise conv kernel
    A_log: Tensor  # [Hv] fp32, log of the decay rate
    dt_bias: Tensor  # [Hv] compute dtype (transformers adds it to a.float())
    norm: Tensor  # [dv] gated RMSNorm weight (plain scale, not 1 + w)
    out: Tensor  # [D, Hv*dv]
    proj: Tensor | None = None  # [C + Hv*dv + 2*Hv, D]: qkv, z, a, b stacked (the four above are its row views),
    #                            so the fused one-token step projects in one GEMV; None when qkv or z is quantized

    @staticmethod
    def stacked(qkv: Tensor, z: Tensor, b: Tensor, a: Tensor, **rest) -> "DeltaWeights":
        """The weights with qkv, z, a and b in one stacked matrix (when none is quantized), else as given."""
        if not all(type(t) is Tensor for t in (qkv, z, a, b)):  # a QuantWeight projects through qlinear
            return DeltaWeights(qkv=qkv, z=z, b=b, a=a, **rest)
        proj = torch.cat([qkv, z, a, b], dim=0)
        qkv, z, a, b = proj.split([qkv.shape[0], z.shape[0], a.shape[0], b.shape[0]], dim=0)
        return DeltaWeights(qkv=qkv, z=z, b=b, a=a, proj=proj, **rest)


@dataclass(frozen=True)
class DeltaShape:
    num_k_heads: int  # Hk
    num_v_heads: int  # Hv, a multiple of Hk (each q/k head serves Hv // Hk value heads)
    k_head_dim: int  # dk
    v_head_dim: int  # dv
    conv_kernel: int  # W
    eps: float  # the gated norm's epsilon

    @property
    def conv_dim(self) -> int:
        return 2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (fla's and transformers' form)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def causal_conv(x: Tensor, weight: Tensor, conv_state: Tensor) -> Tensor:
    """Depthwise causal conv1d + SiLU of x [T, C] after the W-1 inputs held in conv_state [C, W-1], which is
    overwritten in place with the last W-1 inputs (zeros mean "no earlier tokens"). Returns [T, C], x's dtype.

    Computed in the weight's dtype, as transformers does. For T = 1 every shape is static (graph-capturable).
    """
    T, C = x.shape
    W = weight.shape[1]
    full = torch.cat([conv_state.to(weight.dtype), x.t().to(weight.dtype)], dim=1)  # [C, W-1+T]
    conv_state.copy_(full[:, T:])
    # conv1d for one token too: it accumulates in fp32 as transformers' decode step does (a bf16 multiply-then-sum
    # does not); the shapes depend only on T, so the one-token step stays graph-capturable
    out = F.conv1d(full[None], weight[:, None, :], groups=C)[0]  # [C, T]
    return F.silu(out).t().to(x.dtype)  # [T, C]


def _prep(q: Tensor, k: Tensor, Hv: int) -> tuple[Tensor, Tensor]:
    """Grouped value heads: q/k head h serves value heads h*G..h*G+G-1; fp32, L2-normed, q scaled by dk^-0.5."""
    G = Hv // q.shape[1]
    if G > 1:
        q, k = q.repeat_interleave(G, dim=1), k.repeat_interleave(G, dim=1)
    q, k = l2norm(q.float()), l2norm(k.float())
    return q * q.shape[-1] ** -0.5, k


def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    """Token by token (the reference form, and the decode step): q, k [T, Hk, dk], v [T, Hv, dv], g, beta [T, Hv]
    -> output [T, Hv, dv] in v's dtype; state [Hv, dk, dv] fp32 is updated in place."""
    T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k = _prep(q, k, Hv)
    v, g, beta = v.float(), g.float(), beta.float()
    out = torch.empty(T, Hv, dv, dtype=torch.float32, device=v.device)
    for t in range(T):
        state.mul_(g[t].exp()[:, None, None])
        kv_mem = (state * k[t, :, :, None]).sum(dim=-2)  # [Hv, dv] what the state predicts for k_t
        delta = (v[t] - kv_mem) * beta[t, :, None]  # [Hv, dv]
        state.add_(k[t, :, :, None] * delta[:, None, :])
        out[t] = (state * q[t, :, :, None]).sum(dim=-2)
    return out.to(out_dtype)


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                           chunk: int = CHUNK) -> Tensor:
    """The same rule over chunks of N tokens (prefill): within a chunk the N delta updates become one
    unit-triangular solve (the UT transform), and chunks are scanned in order. Same arguments and result as
    `recurrent_gated_delta_rule`; state [Hv, dk, dv] fp32 is updated in place."""
    T, Hv, dv = v.shape
    out_dtype = v.dtype
    q, k = _prep(q, k, Hv)
    v, g, beta = v.float(), g.float(), beta.float()
    pad = (-T) % chunk
    # [Hv, n, N, *]: heads outermost, the sequence cut into n chunks; padding has k = v = 0, g = 0
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1).reshape(Hv, -1, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)).t().reshape(Hv, -1, chunk) for x in (g, beta))
    n = q.shape[1]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    cg = g.cumsum(-1)  # [Hv, n, N] log decay from the chunk start to each position
    decay = (cg[..., :, None] - cg[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [Hv, n, N, N] i >= j
    kb, vb = k * beta[..., None], v * beta[..., None]
    ut = (kb @ k.transpose(-1, -2)) * decay  # [Hv, n, N, N] lower triangle incl. diagonal
    u = torch.linalg.solve_triangular(ut, vb, upper=False, unitriangular=True)  # [Hv, n, N, dv]
    w = torch.linalg.solve_triangular(ut, kb * cg.exp()[..., None], upper=False, unitriangular=True)  # [.., dk]
    intra = (q @ k.transpose(-1, -2)) * decay  # [Hv, n, N, N]
    qd = q * cg.exp()[..., None]  # queries read the state decayed to their position
    kd = k * (cg[..., -1:] - cg).exp()[..., None]  # keys decayed to the chunk end
    last = cg[..., -1].exp()  # [Hv, n]
    out = torch.empty_like(u)
    for i in range(n):
        v_new = u[:, i] - w[:, i] @ state  # [Hv, N, dv] the part of v the old state does not predict
        out[:, i] = qd[:, i] @ state + intra[:, i] @ v_new
        state.mul_(last[:, i, None, None]).add_(kd[:, i].transpose(-1, -2) @ v_new)
    out = out.reshape(Hv, -1, dv)[:, :T].transpose(0, 1)  # [T, Hv, dv]
    return out.to(out_dtype)


def fla_available(device: torch.device) -> bool:
    """True when flash-linear-attention's gated delta rule kernels import on this (CUDA) device."""
    return cuda_library_imports(device, "fla.ops.gated_delta_rule", "chunk_gated_delta_rule",
                                "fused_recurrent_gated_delta_rule")


def pick_delta_backend(requested: str, device: torch.device) -> str:
    """Resolve the DeltaNet backend: "auto" picks fla when it imports on CUDA, else torch; "fla" fails if not."""
    if requested not in BACKENDS:
        raise ValueError(f"DeltaNet backend {requested!r} is not one of {BACKENDS}")
    if requested == "torch":
        return "torch"
    ok = fla_available(device)
    if requested == "fla" and not ok:
        raise ValueError("the fla DeltaNet backend needs a CUDA device and an importable flash-linear-attention "
                         "(pip install flash-linear-attention fla-core); use the torch backend")
    return "fla" if ok else "torch"


def delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, *, backend: str) -> Tensor:
    """The gated delta rule for T tokens, the one place the backend is chosen: T = 1 takes the recurrent form
    (static shapes, the decode step), T > 1 the chunked one. q, k [T, Hk, dk], v [T, Hv, dv], g, beta [T, Hv];
    state [Hv, dk, dv] fp32 updated in place -> [T, Hv, dv] in v's dtype."""
    if backend == "fla":
        return _fla(q, k, v, g, beta, state)
    if q.shape[0] == 1:
        return recurrent_gated_delta_rule(q, k, v, g, beta, state)
    return chunk_gated_delta_rule(q, k, v, g, beta, state)


def _fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> Tensor:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent

    Hv = v.shape[1]
    G = Hv // q.shape[1]
    if G > 1:  # older fla releases need as many q/k heads as value heads
        q, k = q.repeat_interleave(G, dim=1), k.repeat_interleave(G, dim=1)
    fn = fla_recurrent if q.shape[0] == 1 else fla_chunk
    q, k, v = (x.contiguous()[None] for x in (q, k, v))  # [1, T, H, d]: the kernels index dense strides
    out, final = fn(q, k, v, g=g[None].float().contiguous(), beta=beta[None].to(v.dtype).contiguous(),
                    initial_state=state[None], output_final_state=True, use_qk_l2norm_in_kernel=True)
    state.copy_(final[0])
    return out[0]


def gated_rms_norm(x: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """transformers' RMSNormGated: normalise x [.., dv] in fp32, cast back, scale, times silu(gate) in fp32."""
    dt = x.dtype
    y = weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(dt)
    return (y * F.silu(gate.float())).to(dt)


STEPS = ("auto", "triton", "fla", "torch")  # the one-token step: our fused kernels, fla's recurrent kernel, torch


def pick_delta_step(requested: str, backend: str, kernels: bool) -> str:
    """Resolve the one-token DeltaNet step: "auto" takes the fused Triton kernels (kernels/deltanet_step.py) when the
    model runs Triton kernels, else the backend's own one-token form; "triton" needs the kernels, "fla" the fla
    backend."""
    if requested not in STEPS:
        raise ValueError(f"DeltaNet step {requested!r} is not one of {STEPS}")
    if requested == "auto":
        return "triton" if kernels else backend
    if requested == "triton" and not kernels:
        raise ValueError("the triton DeltaNet step needs a CUDA device with Triton kernels on (kernels=True)")
    if requested == "fla" and backend != "fla":
        raise ValueError(f"the fla DeltaNet step needs the fla backend; the backend is {backend!r}")
    return requested


def _fused_step(x: Tensor, w: DeltaWeights, s: DeltaShape, conv_states: Tensor, states: Tensor) -> Tensor:
    """x [B, D] (normed), conv_states [B, C, W-1], states [B, Hv, dk, dv] fp32 (contiguous, updated) -> [B, D]: the
    projections, then the conv, the delta rule and the gated norm in two Triton launches."""
    from tiered.kernels.deltanet_step import deltanet_step

    if w.proj is not None:  # one GEMV, then column views of its rows
        y = F.linear(x, w.proj)
        n = [w.qkv.shape[0], w.z.shape[0], w.a.shape[0], w.b.shape[0]]
        qkv, z, a, b = y.split(n, dim=1)
    else:
        qkv, z, a, b = qlinear(x, w.qkv), qlinear(x, w.z), F.linear(x, w.a), F.linear(x, w.b)
    o = deltanet_step(qkv, w.conv, conv_states, a, b, w.A_log, w.dt_bias, states, z, w.norm,
                      num_k_heads=s.num_k_heads, eps=s.eps)
    return qlinear(o, w.out)


def deltanet(x: Tensor, w: DeltaWeights, shape: DeltaShape, conv_state: Tensor, state: Tensor, *,
             backend: str = "torch", step: str | None = None) -> Tensor:
    """One Gated DeltaNet layer over x [T, D] (already normed), continuing from conv_state [C, W-1] and the
    recurrent state [Hv, dk, dv] fp32 (both updated in place) -> [T, D]. `backend` runs several tokens; `step`
    (pick_delta_step; None = the backend) runs one."""
    T = x.shape[0]
    s = shape
    if T == 1 and step is not None:
        if step == "triton":
            return _fused_step(x, w, s, conv_state[None], state[None])
        backend = step
    Kd = s.num_k_heads * s.k_head_dim
    qkv = causal_conv(qlinear(x, w.qkv), w.conv, conv_state)  # [T, C] (the projections may be stored quantized)
    q = qkv[:, :Kd].reshape(T, s.num_k_heads, s.k_head_dim)
    k = qkv[:, Kd:2 * Kd].reshape(T, s.num_k_heads, s.k_head_dim)
    v = qkv[:, 2 * Kd:].reshape(T, s.num_v_heads, s.v_head_dim)
    beta = torch.sigmoid(F.linear(x, w.b))  # [T, Hv]
    g = -w.A_log.exp() * F.softplus(F.linear(x, w.a).float() + w.dt_bias)  # [T, Hv] fp32, <= 0
    o = delta_rule(q, k, v, g, beta, state, backend=backend)  # [T, Hv, dv]
    z = qlinear(x, w.z).view(T, s.num_v_heads, s.v_head_dim)
    o = gated_rms_norm(o.to(x.dtype), w.norm, z, s.eps)
    return qlinear(o.reshape(T, -1), w.out)


def deltanet_rows(x: Tensor, w: DeltaWeights, shape: DeltaShape, conv_states: Tensor, states: Tensor, *,
                  backend: str = "torch", step: str | None = None) -> Tensor:
    """One token of each of B sequences: x [B, D] (normed), conv_states [B, C, W-1] and states [B, Hv, dk, dv]
    fp32 (contiguous; both updated in place, row b = sequence b) -> [B, D]. The same math as `deltanet` on each
    row alone: the rows are folded into the head and channel dims of one `causal_conv` / `delta_rule` call."""
    B = x.shape[0]
    s = shape
    if step == "triton":
        return _fused_step(x, w, s, conv_states, states)
    backend = step or backend
    Hk, Hv, dk, dv = s.num_k_heads, s.num_v_heads, s.k_head_dim, s.v_head_dim
    Kd = Hk * dk
    C = conv_states.shape[1]
    qkv = qlinear(x, w.qkv)  # [B, C]
    qkv = causal_conv(qkv.reshape(1, B * C), w.conv.repeat(B, 1), conv_states.view(B * C, -1)).view(B, C)
    q = qkv[:, :Kd].reshape(1, B * Hk, dk)  # head b*Hk + h: row b's key head h
    k = qkv[:, Kd:2 * Kd].reshape(1, B * Hk, dk)
    v = qkv[:, 2 * Kd:].reshape(1, B * Hv, dv)
    beta = torch.sigmoid(F.linear(x, w.b)).reshape(1, B * Hv)
    g = (-w.A_log.exp() * F.softplus(F.linear(x, w.a).float() + w.dt_bias)).reshape(1, B * Hv)
    o = delta_rule(q, k, v, g, beta, states.view(B * Hv, dk, dv), backend=backend).view(B, Hv, dv)
    z = qlinear(x, w.z).view(B, Hv, dv)
    o = gated_rms_norm(o.to(x.dtype), w.norm, z, s.eps)
    return qlinear(o.reshape(B, -1), w.out)
