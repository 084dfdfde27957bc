"""Multi-head latent attention (DeepSeek-V3) over a cache of compressed latents.

Owns: `MLAWeights`, `MLACache` (per layer and position: the normed latent c [R] and the roped shared key k_r
[dr], R = kv_lora_rank, dr = qk_rope_head_dim: (R + dr) values per token instead of 2*H*hd), `mla_softmax_scale`
and `mla_attention` with two paths over the same cache: `expanded` (the latents of the span go through kv_b into
per-head keys and values, as transformers computes it: for prefill) and `absorbed` (kv_b's key half is folded
into the query and its value half applied after the weighted sum of latents, so no per-head key or value is
formed: for decode). `mla_attention` is `mla_project` (queries, latent and rope key of the call's tokens), the
cache write, and `mla_attend` (queries over a span of latents); the batch step (decode/batchstep.py) calls the
two halves itself over its paged latents, and `mla_attend_rows` (the absorbed one-token path with a row dim) for
its decode rows in one call. Does not own: the decoder loop (transformer.py) nor the routing.

Tested against transformers' DeepseekV3Attention module (tests/test_mla.py) and, in the decoder, against
DeepseekV3ForCausalLM (tests/test_deepseek_v3.py). The model state holds the cache (model/state.py).

Legend: T tokens in this call, S cache positions read, H heads, D hidden, Rq q_lora_rank, R kv_lora_rank,
dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.kernels.quant_moe import qlinear as linear
from tiered.layout.quant import QuantWeight
from tiered.model.layers import StepPlan, apply_rope, rms_norm


@dataclass(frozen=True)
class MLADims:
    heads: int  # H
    q_lora_rank: int | None  # Rq, None = a full q projection
    kv_lora_rank: int  # R
    nope: int  # dn
    rope: int  # dr
    v: int  # dv
    interleave: bool  # rotary pairs are (x0, x1), (x2, x3), ... (DeepSeek's checkpoints)
    eps: float


@dataclass(frozen=True)
class MLAWeights:
    """The projections may be QuantWeight (--dense q8/q4, an fp8 checkpoint): they go through qlinear. kv_b is
    dense: both paths reshape it per head (the model dequantizes a stored kv_b once, at load)."""
    q_a: Tensor | QuantWeight | None  # [Rq, D]
    q_a_norm: Tensor | None  # [Rq]
    q_b: Tensor | QuantWeight  # [H*(dn+dr), Rq], or [H*(dn+dr), D] when q_a is None
    kv_a: Tensor | QuantWeight  # [R+dr, D]
    kv_a_norm: Tensor  # [R]
    kv_b: Tensor  # [H*(dn+dv), R]
    o: Tensor | QuantWeight  # [D, H*dv]


@dataclass(frozen=True)
class MLACache:
    latent: Tensor  # [L, S, R] normed latents
    k_rope: Tensor  # [L, S, dr] roped shared keys

    @classmethod
    def allocate(cls, layers: int, max_context: int, dims: MLADims, *, device: torch.device,
                 dtype: torch.dtype) -> "MLACache":
        return cls(torch.zeros(layers, max_context, dims.kv_lora_rank, device=device, dtype=dtype),
                   torch.zeros(layers, max_context, dims.rope, device=device, dtype=dtype))

    def bytes_per_token(self) -> int:
        return (self.latent.shape[-1] + self.k_rope.shape[-1]) * self.latent.element_size() * self.latent.shape[0]


def mla_softmax_scale(dims: MLADims, rope_scaling: dict[str, Any] | None) -> float:
    """(dn+dr)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim (transformers' rule)."""
    s = (dims.nope + dims.rope) ** -0.5
    if rope_scaling and rope_scaling.get("rope_type", "default") != "default" and rope_scaling.get("mscale_all_dim"):
        f = rope_scaling["factor"]
        m = 1.0 if f <= 1 else 0.1 * rope_scaling["mscale_all_dim"] * math.log(f) + 1.0
        s = s * m * m
    return s


def _rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool) -> Tensor:
    """x [T, n, dr]; interleaved pairs are first gathered as [evens, odds], which is what transformers' interleaved
    form computes."""
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    return apply_rope(x, cos, sin)


def mla_project(x: Tensor, w: MLAWeights, cos: Tensor, sin: Tensor, dims: MLADims) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x [T, D] (normed) -> q_nope [T, H, dn], q_rot [T, H, dr] (roped), c [T, R] (normed latent), k_rot [T, dr]
    (roped shared key): what one call writes into the cache and queries it with."""
    T = x.shape[0]
    H, R, dn, dr = dims.heads, dims.kv_lora_rank, dims.nope, dims.rope
    if w.q_a is not None:
        q = linear(rms_norm(linear(x, w.q_a), w.q_a_norm, dims.eps), w.q_b)
    else:
        q = linear(x, w.q_b)
    q = q.view(T, H, dn + dr)
    q_nope, q_rot = q[..., :dn], _rope(q[..., dn:], cos, sin, dims.interleave)  # [T, H, dn], [T, H, dr]
    ckv = linear(x, w.kv_a)  # [T, R+dr]
    c = rms_norm(ckv[:, :R], w.kv_a_norm, dims.eps)  # [T, R]
    k_rot = _rope(ckv[:, None, R:], cos, sin, dims.interleave)[:, 0]  # [T, dr]
    return q_nope, q_rot, c, k_rot


def mla_attend(q_nope: Tensor, q_rot: Tensor, cs: Tensor, ks: Tensor, kv_b: Tensor, mask: Tensor | None,
               dims: MLADims, scale: float, *, absorbed: bool) -> Tensor:
    """T queries (q_nope [T, H, dn], q_rot [T, H, dr]) over S cached positions (latents cs [S, R], rope keys
    ks [S, dr]); mask [T, S] bool or None -> [T, H*dv] (before o_proj). The batch step calls it per row over
    that row's gathered pages."""
    T = q_nope.shape[0]
    H, R, dn, dr, dv = dims.heads, dims.kv_lora_rank, dims.nope, dims.rope, dims.v
    kvb = kv_b.view(H, dn + dv, R)
    if not absorbed:  # per-head keys [nope | shared rope] and values, one SDPA call as transformers computes it
        kv = F.linear(cs, kv_b).view(-1, H, dn + dv)  # [S, H, dn+dv]
        S = kv.shape[0]
        k = torch.cat([kv[..., :dn], ks[:, None, :].expand(S, H, dr)], dim=-1).transpose(0, 1)  # [H, S, dn+dr]
        qf = torch.cat([q_nope, q_rot], dim=-1).transpose(0, 1)  # [H, T, dn+dr]
        m = None if mask is None else mask[None]
        o = F.scaled_dot_product_attention(qf, k, kv[..., dn:].transpose(0, 1), attn_mask=m, scale=scale)
        return o.transpose(0, 1).reshape(T, H * dv)
    rope_scores = torch.einsum("thd,sd->hts", q_rot, ks)  # [H, T, S]
    q_lat = torch.einsum("thd,hdr->htr", q_nope, kvb[:, :dn])  # [H, T, R]
    s = (torch.matmul(q_lat, cs.t()) + rope_scores) * scale
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q_nope.dtype)  # [H, T, S]
    o = torch.einsum("hts,sr->htr", p, cs)  # [H, T, R]
    o = torch.einsum("htr,hvr->thv", o, kvb[:, dn:])  # [T, H, dv]
    return o.reshape(T, H * dv)


def mla_attend_rows(q_nope: Tensor, q_rot: Tensor, cs: Tensor, ks: Tensor, lengths: Tensor, kv_b: Tensor,
                    dims: MLADims, scale: float) -> Tensor:
    """One query per row, kv_b absorbed (mla_attend's one-token path with a row dim): q_nope [B, H, dn], q_rot
    [B, H, dr] over each row's latents cs [B, S, R] and rope keys ks [B, S, dr], of which the first lengths[b]
    (int [B] on the device) are the row's -> [B, H*dv]. The batch step's decode rows, over their gathered pages."""
    B = q_nope.shape[0]
    H, dn, dv = dims.heads, dims.nope, dims.v
    kvb = kv_b.view(H, dn + dv, -1)
    rope_scores = torch.einsum("bhd,bsd->bhs", q_rot, ks)  # [B, H, S]
    q_lat = torch.einsum("bhd,hdr->bhr", q_nope, kvb[:, :dn])  # [B, H, R]
    s = (torch.matmul(q_lat, cs.transpose(1, 2)) + rope_scores) * scale
    pos = torch.arange(cs.shape[1], device=cs.device)
    s = s.masked_fill((pos[None, :] >= lengths[:, None])[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q_nope.dtype)  # [B, H, S]
    o = torch.matmul(p, cs)  # [B, H, R]
    o = torch.einsum("bhr,hvr->bhv", o, kvb[:, dn:])  # [B, H, dv]
    return o.reshape(B, H * dv)


def mla_attention(x: Tensor, w: MLAWeights, cache: MLACache, layer: int, plan: StepPlan, dims: MLADims,
                  scale: float, *, absorbed: bool) -> Tensor:
    """x [T, D] (normed) -> [T, D]; writes this call's latents and rope keys at the plan's positions.
    plan.mask is [T, S] (built with groups = 1) or None."""
    T = x.shape[0]
    q_nope, q_rot, c, k_rot = mla_project(x, w, plan.cos, plan.sin, dims)
    lat, kr = cache.latent[layer], cache.k_rope[layer]  # [S, R], [S, dr]
    if isinstance(plan.write_at, int):
        lat[plan.write_at:plan.write_at + T] = c
        kr[plan.write_at:plan.write_at + T] = k_rot
    else:
        lat.index_copy_(0, plan.write_at, c)
        kr.index_copy_(0, plan.write_at, k_rot)
    cs, ks = lat[plan.read_lo:plan.read_hi], kr[plan.read_lo:plan.read_hi]  # [S, R], [S, dr]
    o = mla_attend(q_nope, q_rot, cs, ks, w.kv_b, plan.mask, dims, scale, absorbed=absorbed)
    return linear(o, w.o)
