"""The attention glue between the qkv projection and the attention kernel, in one Triton launch: q/k norms,
clipping, the rotary embedding, and the new keys and values stored straight into the KV cache rows.

Owns: `qk_rope(qkv, cos, sin, ...)` -> q [T, H, hd] (and k, v written into given row buffers: a layer's cache
seen as [S, KV, hd], a paged pool seen as [N*P, KV, hd], or fresh [T, KV, hd] tensors).
Does not own: the torch reference it must match (model/layers.py `project_qkv` + `_write_kv`), the cache buffers
(layers.KVCache, the batch step's page pools), the qkv projection (a GEMV before it), nor the attention.

What one program does, for token t and one norm group g of the q|k columns of qkv:
    norm "head" (Qwen3-MoE, Qwen3.5): a group is one head (hd columns), weight [H+KV, hd] read flat;
    norm "proj" (OLMoE): group 0 = all of q (H*hd columns), group 1 = all of k, weight [H*hd + KV*hd] flat;
    norm None: groups are heads, no norm.
    x = rms_norm(group, weight)  (layers.rms_norm's roundings: fp32 normalise, cast, scale; fp32 weights scale
        before the cast), clamped to +-clip when the family clips (OLMoE's clip_qkv), then each head's leading
        r dims rotated (layers.apply_rope: partner of dim d < r is (d + r/2) % r, sin sign-folded, and the two
        products and their sum each rounded to the compute dtype as torch does), dims >= r passed through.
    q groups store q; k groups store k at row `positions[t]` (a device tensor: graphs) or `start + t`, and copy
    (and clip) the matching v columns to the same row.
Every rounding is the reference's; rstd's fp32 sum of squares runs in another order (last-bit differences).

Legend: T tokens, H query heads, KV key/value heads, hd head dim, r rotary dims (<= hd), S cache rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tiered.kernels.fused_norm import _check_device, _round_to, _warps, triton, tl
from tiered.kernels.pdl import gdc_enter, launch_args

NORMS = (None, "head", "proj")


def qk_rope(qkv: Tensor, cos: Tensor, sin: Tensor, *, heads: int, kv_heads: int, head_dim: int,
            norm: str | None = None, norm_weight: Tensor | None = None, eps: float = 1e-6,
            clip: float | None = None, k_out: Tensor | None = None, v_out: Tensor | None = None,
            positions: Tensor | int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """qkv [T, >= (H+2KV)*hd] (rows may be strided; columns q | k | v [| gate]), cos/sin [T, r] (layers.Rope rows)
    -> (q [T, H, hd], k_out, v_out).

    norm: None, "head" (norm_weight [H+KV, hd]: q's norm on H rows, k's on KV rows) or "proj" (norm_weight
    [(H+KV)*hd]: q_norm then k_norm). k_out/v_out: [S, KV, hd] row buffers (last dim contiguous), written at rows
    `positions` ([T] int64 on the device, or an int: rows positions..positions+T-1); None = new [T, KV, hd]
    tensors (rows 0..T-1).
    """
    _check_device(qkv, "qk_rope")
    H, KV, hd = heads, kv_heads, head_dim
    T = qkv.shape[0]
    nq, nk = H * hd, KV * hd
    if qkv.dim() != 2 or qkv.shape[1] < nq + 2 * nk or qkv.stride(1) != 1:
        raise ValueError(f"qk_rope wants qkv [T, >= {nq + 2 * nk}] with contiguous columns, got {tuple(qkv.shape)} "
                         f"strides {qkv.stride()}")
    if norm not in NORMS:
        raise ValueError(f"qk_rope: norm {norm!r} is not one of {NORMS}")
    r = cos.shape[-1]
    if r > hd or r % 2 or cos.shape != sin.shape or cos.shape[0] != T:
        raise ValueError(f"qk_rope: cos/sin {tuple(cos.shape)}/{tuple(sin.shape)} do not fit T={T}, hd={hd}")
    if norm is not None:
        want = (H + KV) * hd
        if norm_weight is None or norm_weight.numel() != want:
            raise ValueError(f"qk_rope: norm {norm!r} needs a weight of {want} elements "
                             f"([H+KV, hd] or [(H+KV)*hd]), got {None if norm_weight is None else tuple(norm_weight.shape)}")
        nw = norm_weight.reshape(-1)
        if nw.stride(0) != 1:
            nw = nw.contiguous()
    else:
        nw = qkv  # never read
    q = torch.empty((T, H, hd), dtype=qkv.dtype, device=qkv.device)
    if k_out is None:
        k_out = torch.empty((T, KV, hd), dtype=qkv.dtype, device=qkv.device)
        v_out = torch.empty((T, KV, hd), dtype=qkv.dtype, device=qkv.device)
    for name, buf in (("k_out", k_out), ("v_out", v_out)):
        if buf is None or buf.dim() != 3 or buf.shape[1:] != (KV, hd) or buf.stride(2) != 1 or buf.dtype != qkv.dtype:
            raise ValueError(f"qk_rope: {name} must be [S, {KV}, {hd}] {qkv.dtype} with a contiguous last dim, "
                             f"got {None if buf is None else (tuple(buf.shape), buf.stride(), buf.dtype)}")
    if T == 0:
        return q, k_out, v_out
    has_pos = isinstance(positions, Tensor)
    pos = positions.reshape(-1) if has_pos else qkv  # never read without HAS_POS
    if has_pos and pos.numel() != T:
        raise ValueError(f"qk_rope: {pos.numel()} positions for {T} tokens")
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    proj = norm == "proj"
    nqg, glen_q, glen_k = (1, nq, nk) if proj else (H, hd, hd)
    groups = nqg + (1 if proj else KV)
    block = triton.next_power_of_2(max(glen_q, glen_k))
    _QK_ROPE[(T, groups)](
        qkv, nw, cos, sin, q, k_out, v_out, pos, 0 if has_pos else int(positions), float(eps),
        float(clip) if clip is not None else 0.0,
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0), k_out.stride(0), k_out.stride(1),
        v_out.stride(0), v_out.stride(1),
        NQ=nq, NK=nk, HD=hd, R=r, NQG=nqg, GLEN_Q=glen_q, GLEN_K=glen_k, BLOCK=block, NORM=norm is not None,
        W32=nw.dtype == torch.float32 and norm is not None, CLIP=clip is not None, HAS_POS=has_pos,
        num_warps=_warps(block), **launch_args(qkv.device))
    return q, k_out, v_out


# --- kernel (a plain function, wrapped by triton.jit below: compiled, or interpreted on CPU) ---

def _qk_rope_kernel(QKV, NW, COS, SIN, Q, KO, VO, POS, pos0, eps, clip,
                    s_qkv, s_cos, s_sin, s_q, s_kr, s_kh, s_vr, s_vh,
                    NQ: tl.constexpr, NK: tl.constexpr, HD: tl.constexpr, R: tl.constexpr, NQG: tl.constexpr,
                    GLEN_Q: tl.constexpr, GLEN_K: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr,
                    W32: tl.constexpr, CLIP: tl.constexpr, HAS_POS: tl.constexpr, GDC: tl.constexpr = False):
    gdc_enter(GDC)
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    is_k = g >= NQG
    col0 = tl.where(is_k, NQ + (g - NQG) * GLEN_K, g * GLEN_Q)  # first q|k column of this norm group
    glen = tl.where(is_k, GLEN_K, GLEN_Q)
    o = tl.arange(0, BLOCK)
    m = o < glen
    col = col0 + o  # [BLOCK] columns in qkv (q: < NQ, k: NQ..NQ+NK-1); heads never straddle a group
    d = col % HD
    rot = d < R
    pcol = tl.where(rot, col - d + (d + R // 2) % R, col)  # rotary partner (itself past r)
    row = QKV + t * s_qkv
    x = tl.load(row + col, mask=m, other=0.0).to(tl.float32)
    xp = tl.load(row + pcol, mask=m, other=0.0).to(tl.float32)
    dt = Q.dtype.element_ty
    if NORM:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / glen + eps)
        w = tl.load(NW + col, mask=m, other=0.0).to(tl.float32)
        wp = tl.load(NW + pcol, mask=m, other=0.0).to(tl.float32)
        if W32:
            x = _round_to(x * rstd * w, dt).to(tl.float32)
            xp = _round_to(xp * rstd * wp, dt).to(tl.float32)
        else:
            x = _round_to(_round_to(x * rstd, dt).to(tl.float32) * w, dt).to(tl.float32)
            xp = _round_to(_round_to(xp * rstd, dt).to(tl.float32) * wp, dt).to(tl.float32)
    if CLIP:  # torch clamps in the compute dtype: a clamped value is the bound rounded to it
        x = _round_to(tl.minimum(tl.maximum(x, -clip), clip), dt).to(tl.float32)
        xp = _round_to(tl.minimum(tl.maximum(xp, -clip), clip), dt).to(tl.float32)
    c = tl.load(COS + t * s_cos + d, mask=m & rot, other=1.0).to(tl.float32)
    s = tl.load(SIN + t * s_sin + d, mask=m & rot, other=0.0).to(tl.float32)
    a = _round_to(x * c, dt).to(tl.float32)
    b = _round_to(xp * s, dt).to(tl.float32)
    y = tl.where(rot, _round_to(a + b, dt), _round_to(x, dt))
    if is_k:
        if HAS_POS:
            dst = tl.load(POS + t).to(tl.int64)
        else:
            dst = pos0 + t
        kc = col - NQ
        kvh = kc // HD
        tl.store(KO + dst * s_kr + kvh * s_kh + d, y, mask=m)
        v = tl.load(row + NQ + NK + kc, mask=m, other=0.0)
        if CLIP:
            v = _round_to(tl.minimum(tl.maximum(v.to(tl.float32), -clip), clip), dt)
        tl.store(VO + dst * s_vr + kvh * s_vh + d, v, mask=m)
    else:
        tl.store(Q + t * s_q + col, y, mask=m)


_QK_ROPE = None
if triton is not None:
    _QK_ROPE = triton.jit(_qk_rope_kernel)
