"""The dense pieces of one decoder layer: RMSNorm, rotary tables, attention over a preallocated KV cache.

Owns: `rms_norm`, `Rope` (the cos/sin tables for every position up to max_context), `KVCache`
(one preallocated buffer per model, sized by max_context), `StepPlan` (what every layer's attention
needs for one forward call: rotary rows, where to write K/V, which cache span to read, the mask, or
the cache lengths on the device) and `attention` (SDPA; one-token steps through our Triton kernel,
tiered/kernels/attention.py, which reads the cache as pages and the length from the device; or
flash-attn's `flash_attn_with_kvcache` when asked for and importable), `pick_backend` (--attn).
`attention(..., glue=True)` (CUDA) runs the glue between the qkv GEMV and the attention kernel as one
Triton launch (`project_qkv_fused`: q/k norms, clip, rotary, K/V stored in the cache; kernels/fused_rope.py);
`glue_available` says where it may. The torch functions here stay the reference and the CPU path.
Does not own: weights (transformer.py builds `AttnWeights` from the dense dict), experts (moe.py),
the kernels (kernels/attention.py, kernels/fused_*.py).

The math follows transformers' modeling files for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE,
including their dtype casts (RMSNorm normalises in fp32 and casts back before scaling).

Legend: T tokens in this call, S cache positions read, H query heads, KV key/value heads,
G = H // KV query heads per KV head, hd head dim, D hidden.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.kernels import cuda_library_imports
from tiered.kernels.quant_moe import qlinear as linear
from tiered.layout.config import ModelConfig
from tiered.model import sinkflash
from tiered.model.rope import ROPE_TYPES, inv_freq_and_scale, rope_kind

ATTN_BACKENDS = ("auto", "triton", "flash", "sdpa")
SINKS_NEED_SDPA = "attention sinks (gpt-oss) run on the sdpa path only: use --attn sdpa (or auto)"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim: normalised in fp32, cast back, then scaled (transformers' order of roundings).

    F.rms_norm without a weight does the fp32 part (one fused kernel on CUDA; on CPU the same ops as
    transformers' code), and the scale comes after the cast, as in transformers. `weight` broadcasts
    against x: [D], or [n, hd] for per-head norms of n heads at once.
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.dim() == 1:
        return F.rms_norm(x, weight.shape, weight, eps)
    if weight.dtype == torch.float32:  # zero-centred norms (Qwen3.5): (1 + w) kept in fp32, scaled before the cast
        return (F.rms_norm(x.float(), (x.shape[-1],), None, eps) * weight).to(x.dtype)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def check_rope(config: ModelConfig) -> None:
    """Raise unless the config's rotary embedding is one tiered implements (model/rope.py: default, YaRN)."""
    kind = rope_kind(config.rope_scaling)
    if kind not in ROPE_TYPES:
        raise NotImplementedError(
            f"rope_scaling type {kind!r} ({config.rope_scaling}) is not supported: tiered implements {ROPE_TYPES}; "
            "use another checkpoint or add the scaling to tiered/model/rope.py")


@dataclass(frozen=True)
class Rope:
    cos: Tensor  # [P, hd] compute dtype, row p = position p
    sin: Tensor  # [P, hd] with the first half negated: rotate_half(x) * sin == swap_halves(x) * this

    @classmethod
    def build(cls, config: ModelConfig, positions: int, *, device: torch.device, dtype: torch.dtype) -> "Rope":
        """Tables for positions 0..positions-1, computed in fp32 on `device` as transformers does."""
        check_rope(config)
        hd = config.extra.get("rope_dim", config.rotary_dim)  # partial rotary: only the leading hd dims turn
        inv_freq, scale = inv_freq_and_scale(config.rope_theta, hd, config.rope_scaling,
                                             config.max_position_embeddings, device)
        pos = torch.arange(positions, device=device, dtype=torch.float)
        freqs = pos[:, None] * inv_freq[None, :]  # [P, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:  # YaRN's attention factor, applied in fp32 as transformers does
            cos, sin = cos * scale, sin * scale
        sin = sin.to(dtype)
        sin[:, :hd // 2].neg_()  # negation is exact, so this equals transformers' rotate_half form bit for bit
        return cls(cos=cos.to(dtype), sin=sin)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, n, hd], cos/sin [T, r] (sin sign-folded, see Rope) -> x with its leading r dims rotated, same shape."""
    T, n, hd = x.shape
    r = cos.shape[-1]
    if r < hd:  # partial rotary (Qwen3.5): the trailing hd - r dims pass through
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    swapped = x.reshape(T, n, 2, hd // 2).flip(2).reshape(T, n, hd)  # [x2, x1]
    return x * cos[:, None, :] + swapped * sin[:, None, :]


@dataclass(frozen=True)
class KVCache:
    """Preallocated keys and values for every layer.

    sdpa layout: k, v [L, KV, S, hd] (heads outermost, so a layer's span is one strided view);
    flash layout: k, v [L, 1, S, KV, hd] (what flash_attn_with_kvcache reads and writes).
    paged: each layer's k and v seen as one page [1, S, KV, hd] (a strided view, no copy) with the block
    table [[0]]: what the paged decode kernel reads (`pages`); None unless allocated with paged=True.
    """
    k: Tensor
    v: Tensor
    flash: bool
    paged: tuple[tuple[Tensor, Tensor], ...] | None = None  # [L] (k, v) pages [1, S, KV, hd]
    table: Tensor | None = None  # [1, 1] int32 block table of the single sequence

    @classmethod
    def allocate(cls, config: ModelConfig, max_context: int, *, device: torch.device, dtype: torch.dtype,
                 flash: bool = False, paged: bool = False, layers: int | None = None) -> "KVCache":
        """Rows for `layers` attention layers (default: every layer)."""
        L = config.num_layers if layers is None else layers
        KV, hd = config.num_kv_heads, config.head_dim
        shape = (L, 1, max_context, KV, hd) if flash else (L, KV, max_context, hd)
        k, v = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        views, table = None, None
        if paged:  # only the triton backend asks: the kernels module (and triton) is imported for it alone
            from tiered.kernels.attention import paged_view

            views = tuple(tuple(paged_view(x[l][0] if flash else x[l], heads_first=not flash)[0] for x in (k, v))
                          for l in range(L))
            table = torch.zeros((1, 1), dtype=torch.int32, device=device)
        return cls(k, v, flash, views, table)

    @property
    def max_context(self) -> int:
        return self.k.shape[2]


@dataclass(frozen=True)
class StepPlan:
    """Everything about positions that one forward call shares across layers.

    Eager calls write at a Python int and read a Python-sized span; graph-captured decode writes at
    a device position tensor and reads a fixed span with a device-built mask, so nothing syncs.
    """
    cos: Tensor  # [T, hd]
    sin: Tensor  # [T, hd]
    write_at: int | Tensor  # first position written (int), or positions [T] int64 on device
    read_lo: int  # attend over cache positions [read_lo, read_hi)
    read_hi: int
    mask: Tensor | None  # [G*T, S] bool, True = attend; None = every position in the span
    seqlens: Tensor | None = None  # flash: int32 [1], tokens already in the cache before this call
    lengths: Tensor | None = None  # triton: int32 [1], tokens in the cache after this call's writes; None = SDPA
    sliding: "StepPlan | None" = None  # the plan of sliding-window layers, in models that mix them (gpt-oss)
    window: int | None = None  # the window the mask applies (eager plans; sinkflash needs it without the mask)


def plan_eager(rope: Rope, start: int, T: int, *, groups: int, window: int | None,
               paged: bool = False) -> StepPlan:
    """Plan for T tokens at positions start..start+T-1 with the cache filled up to `start`.

    paged: the triton backend; a one-token plan then carries the cache length on the device (the kernel
    path, as in graphed steps), longer ones take SDPA.
    """
    end = start + T
    lo = 0 if window is None else max(0, start - window + 1)  # the oldest key any of the T queries sees
    mask = lengths = None
    if T > 1:  # one query needs no mask: the span [lo, end) is exactly what it sees
        mask = attn_mask(torch.arange(start, end, device=rope.cos.device), lo, end, window=window, groups=groups)
    elif paged:
        lengths = torch.full((1,), end, dtype=torch.int32, device=rope.cos.device)
    return StepPlan(rope.cos[start:end], rope.sin[start:end], start, lo, end, mask, lengths=lengths, window=window)


def attn_mask(qpos: Tensor, lo: int, hi: int, *, window: int | None, groups: int) -> Tensor:
    """Bool mask [G*T, hi-lo] for query positions qpos [T] over cache positions lo..hi-1.

    A query at p sees keys at s <= p, and with a window W only s > p - W (transformers' rule).
    Rows are ordered (g, t), matching the grouped-query layout in `attention`.
    """
    s = torch.arange(lo, hi, device=qpos.device)
    ok = s[None, :] <= qpos[:, None]  # [T, S]
    if window is not None:
        ok &= s[None, :] > qpos[:, None] - window
    return ok.repeat(groups, 1)


@dataclass(frozen=True)
class AttnWeights:
    qkv: Tensor  # [(H+2KV)*hd, D] q, k, v projections stacked (one GEMM instead of three), then the H*hd
    #              output-gate rows when config.attn_output_gate
    qkv_bias: Tensor | None  # [(H+2KV)*hd]
    o: Tensor  # [D, H*hd]
    q_norm: Tensor | None  # [H*hd] ("proj"); for "head", [H+KV, hd]: q's norm on H rows, k's on KV rows
    k_norm: Tensor | None  # [KV*hd] ("proj"); None for "head" (folded into q_norm)
    o_bias: Tensor | None = None  # [D] (gpt-oss)
    sinks: Tensor | None = None  # [H] fp32 learned per-head sink logits (gpt-oss): attention_with_sinks
    qk_cat: Tensor | None = None  # "proj": q_norm then k_norm [(H+KV)*hd], the fused glue kernel's one weight


def attention(x: Tensor, w: AttnWeights, cache: KVCache, layer: int, plan: StepPlan, config: ModelConfig,
              *, backend: str = "sdpa", glue: bool = False) -> Tensor:
    """Self-attention of x [T, D] (already normed) with the cache; writes this call's K/V; returns [T, D].
    `layer` is the layer's row in the cache (ModelState.row). With `attn_output_gate` the output is multiplied
    by sigmoid of the gate rows before o_proj (Qwen3.5).

    q and k stay side by side as [T, H+KV, hd] (as the stacked projection leaves them), so per-head
    norms and the rotary embedding each run once over both: fewer kernels per decode step.
    glue: the norms, rotary and the K/V store in one Triton launch (`project_qkv_fused`); flash-attn stores
    its own K/V, so that backend keeps the torch glue.
    """
    if glue and backend != "flash" and not cache.flash:
        kc, vc = cache.k[layer], cache.v[layer]  # [KV, S, hd]
        q, *gate = project_qkv_fused(x, w, plan.cos, plan.sin, config, kc.transpose(0, 1), vc.transpose(0, 1),
                                     plan.write_at, with_gate=config.attn_output_gate)
        k = v = None  # already in the cache
    else:
        q, k, v, *gate = project_qkv(x, w, plan.cos, plan.sin, config, with_gate=config.attn_output_gate)
    if w.sinks is not None:
        out = attention_with_sinks(q, k, v, cache, layer, plan, config.num_heads // config.num_kv_heads, w.sinks)
    elif backend == "flash":
        out = _flash(q, k, v, cache, layer, plan, config)
    elif plan.lengths is not None:  # the triton backend's one-token steps (its prefill takes SDPA)
        out = _paged(q, k, v, cache, layer, plan, config)
    else:
        out = _sdpa(q, k, v, cache, layer, plan, config.num_heads // config.num_kv_heads)
    if gate:
        out = out * torch.sigmoid(gate[0])
    return linear(out, w.o, w.o_bias)


def project_qkv(x: Tensor, w: AttnWeights, cos: Tensor, sin: Tensor, config: ModelConfig, *,
                with_gate: bool = False) -> tuple[Tensor, ...]:
    """x [T, D] (normed) -> q [T, H, hd], k [T, KV, hd] (normed per family, rotated by cos/sin [T, r]), v [T, KV, hd],
    and with `with_gate` (config.attn_output_gate) the output gate [T, H*hd] (before its sigmoid).

    Shared by the contiguous-cache attention above and the paged attention of the batch step.
    """
    T = x.shape[0]
    H, KV, hd = config.num_heads, config.num_kv_heads, config.head_dim
    eps = config.rms_norm_eps
    qkv = linear(x, w.qkv, w.qkv_bias)  # [T, (H+2KV)*hd]
    nq, nk = H * hd, KV * hd
    if config.qk_norm == "proj":  # one norm over each whole projection (OLMoE)
        qk = torch.cat([rms_norm(qkv[:, :nq], w.q_norm, eps), rms_norm(qkv[:, nq:nq + nk], w.k_norm, eps)], -1)
        qk = qk.view(T, H + KV, hd)
    else:
        qk = qkv[:, :nq + nk].view(T, H + KV, hd)
        if config.qk_norm == "head":  # per head (Qwen3-MoE)
            qk = rms_norm(qk, w.q_norm, eps)
    v = qkv[:, nq + nk:nq + 2 * nk].view(T, KV, hd)
    if config.clip_qkv is not None:
        c = config.clip_qkv
        qk, v = qk.clamp(-c, c), v.clamp(-c, c)
    qk = apply_rope(qk, cos, sin)  # [T, H+KV, hd]
    if with_gate:  # the output-gate rows stacked after v (Qwen3.5)
        return qk[:, :H], qk[:, H:], v, qkv[:, nq + 2 * nk:]
    return qk[:, :H], qk[:, H:], v


def project_qkv_fused(x: Tensor, w: AttnWeights, cos: Tensor, sin: Tensor, config: ModelConfig, k_rows: Tensor,
                      v_rows: Tensor, positions: Tensor | int, *, with_gate: bool = False) -> tuple[Tensor, ...]:
    """`project_qkv` with everything after the GEMV in one Triton launch (kernels/fused_rope.py), the same roundings:
    x [T, D] (normed) -> q [T, H, hd] (and the output gate [T, H*hd] with `with_gate`); this call's k and v are
    stored at rows `positions` ([T] int64 on the device, or the first row as an int) of k_rows/v_rows
    [S, KV, hd] (a layer's cache seen token-major, or a page pool seen as [N*P, KV, hd])."""
    from tiered.kernels.fused_rope import qk_rope

    H, KV, hd = config.num_heads, config.num_kv_heads, config.head_dim
    qkv = linear(x, w.qkv, w.qkv_bias)  # [T, (H+2KV)*hd (+ H*hd gate)]
    norm = None if config.qk_norm == "none" else config.qk_norm
    nw = None
    if norm == "head":
        nw = w.q_norm
    elif norm == "proj":
        nw = w.qk_cat if w.qk_cat is not None else torch.cat([w.q_norm, w.k_norm])
    q, _, _ = qk_rope(qkv, cos, sin, heads=H, kv_heads=KV, head_dim=hd, norm=norm, norm_weight=nw,
                      eps=config.rms_norm_eps, clip=config.clip_qkv, k_out=k_rows, v_out=v_rows, positions=positions)
    if with_gate:
        return q, qkv[:, (H + 2 * KV) * hd:]
    return (q,)


def glue_available(device: torch.device) -> bool:
    """True when the fused glue kernels (kernels/fused_*.py) can run on `device`: CUDA with triton importable,
    or (tests) any device once they were built for Triton's interpreter."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    if device.type != "cuda" and "triton" not in sys.modules:
        return False  # on CPU only an interpreter-mode import (made by the tests) makes the kernels usable
    from tiered.kernels import fused_norm

    return fused_norm.triton is not None and (device.type == "cuda" or fused_norm.interpreted())


def _write_kv(k: Tensor | None, v: Tensor | None, cache: KVCache, layer: int, plan: StepPlan) -> None:
    """Store this call's k, v [T, KV, hd] in the sdpa-layout cache at plan.write_at (an int or positions [T]);
    None: the fused glue kernel stored them already."""
    if k is None:
        return
    T = k.shape[0]
    kc, vc = cache.k[layer], cache.v[layer]  # [KV, S, hd]
    if isinstance(plan.write_at, int):
        kc[:, plan.write_at:plan.write_at + T] = k.transpose(0, 1)
        vc[:, plan.write_at:plan.write_at + T] = v.transpose(0, 1)
    else:
        kc.index_copy_(1, plan.write_at, k.transpose(0, 1))
        vc.index_copy_(1, plan.write_at, v.transpose(0, 1))


SHORT_CAPACITY = 1024  # the paged kernel's grid for caches of at most this many tokens (session 46)
SHORT_CAPACITY_ENV = "TIERED_SHORT_CAPACITY"  # overrides it; 0 = every step's grid sized for max_context


def kernel_capacity(n: int, max_context: int) -> int:
    """The cache capacity the paged decode kernel's grid (its splits) is sized for when a one-token step reads at
    most n tokens: SHORT_CAPACITY (or TIERED_SHORT_CAPACITY) while n fits in it, else max_context. A grid sized for
    4,096 positions over a 528-token cache took 7.1 us a layer against 4.8 for one sized for 800 (session 46,
    H100): most of its splits hold no keys. The triton backend captures a graph for each (Transformer.graph_spans).
    """
    raw = os.environ.get(SHORT_CAPACITY_ENV, "").strip()
    try:
        cap = int(raw) if raw else SHORT_CAPACITY
    except ValueError:
        cap = -1
    if cap < 0:
        raise ValueError(f"{SHORT_CAPACITY_ENV}={raw!r}: expected a number of positions (0 turns it off)")
    short = min(cap, max_context) if cap else max_context
    return short if n <= short else max_context


def _paged(q: Tensor, k: Tensor | None, v: Tensor | None, cache: KVCache, layer: int, plan: StepPlan,
           config: ModelConfig) -> Tensor:
    """Write k, v, then the Triton decode kernel over the cache seen as one page; the length comes from
    plan.lengths on the device, and the kernel's splits are sized for `kernel_capacity(plan.read_hi)` (an eager
    step's read_hi is its length, a graph's its span, the same capacity: Transformer.graph_span), so eager and
    graphed steps compute the same sums in the same order."""
    from tiered.kernels.attention import decode_attention

    T, H, hd = q.shape
    _write_kv(k, v, cache, layer, plan)
    kp, vp = cache.paged[layer]
    out = decode_attention(q[None], kp, vp, cache.table, plan.lengths, scale=hd ** -0.5,
                           window=config.sliding_window,
                           max_seqlen=kernel_capacity(plan.read_hi, cache.max_context))  # [1, T, H, hd]
    return out.view(T, H * hd)


def attention_with_sinks(q: Tensor, k: Tensor | None, v: Tensor | None, cache: KVCache, layer: int, plan: StepPlan,
                         G: int, sinks: Tensor) -> Tensor:
    """Attention whose softmax has one more logit per head, the learned sink, that takes weight but adds no value
    (gpt-oss). q [T, H, hd], k/v [T, KV, hd] -> [T, H*hd]. Plain matmuls, as transformers' eager path: scores
    over the span, the sink column appended, max subtracted, softmax, the sink column dropped. A prompt on CUDA
    (T > 1, an eager plan) takes flash attention with the sink's exact correction instead (model/sinkflash.py)."""
    T, H, hd = q.shape
    _write_kv(k, v, cache, layer, plan)
    kc, vc = cache.k[layer], cache.v[layer]  # [KV, S, hd]
    KV = kc.shape[0]
    ks, vs = kc[:, plan.read_lo:plan.read_hi], vc[:, plan.read_lo:plan.read_hi]  # [KV, S, hd]
    if T > 1 and isinstance(plan.write_at, int) and plan.read_hi == plan.write_at + T and sinkflash.usable(q):
        # an eager (or padded first-chunk) prompt: flash over the span, keys token-major views of the cache
        o = sinkflash.flash_sinks(q, ks.transpose(0, 1), vs.transpose(0, 1), sinks, scale=hd ** -0.5,
                                  window=plan.window)  # [T, H, hd]
        return o.reshape(T, H * hd)
    qg = q.transpose(0, 1).reshape(KV, G * T, hd)  # rows (g, t)
    o = sinks_attend(qg, ks, vs, plan.mask, sink_rows(sinks, KV, G, T), hd ** -0.5)  # [KV, G*T, hd]
    return o.reshape(H, T, hd).transpose(0, 1).reshape(T, H * hd)


def sink_rows(sinks: Tensor, KV: int, G: int, T: int) -> Tensor:
    """The per-head sinks [H] as one logit per query row [KV, G*T, 1], rows (g, t) of each KV head (the grouped
    layout of attention_with_sinks and the batch step's rows)."""
    return sinks.view(KV, G, 1, 1).expand(KV, G, T, 1).reshape(KV, G * T, 1)


def sinks_attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, sink: Tensor, scale: float) -> Tensor:
    """Attention with one more logit per query row, the sink, which takes weight and adds no value (gpt-oss):
    q [..., R, hd], k / v [..., S, hd], mask broadcastable to [..., R, S] (True = attend) or None, sink
    broadcastable to [..., R, 1] -> [..., R, hd]. Plain matmuls, as transformers' eager path: scores, the sink
    column appended, max subtracted, softmax, the sink column dropped."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [..., R, S]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    s = torch.cat([s, sink.to(s.dtype).expand(*s.shape[:-1], 1)], dim=-1)
    s = s - s.max(dim=-1, keepdim=True).values
    p = torch.softmax(s, dim=-1)[..., :-1].to(v.dtype)
    return torch.matmul(p, v)


def _sdpa(q: Tensor, k: Tensor | None, v: Tensor | None, cache: KVCache, layer: int, plan: StepPlan, G: int) -> Tensor:
    T, H, hd = q.shape
    _write_kv(k, v, cache, layer, plan)
    kc, vc = cache.k[layer], cache.v[layer]  # [KV, S, hd]
    KV = kc.shape[0]
    # Query head h uses KV head h // G: fold the G heads of a KV head into rows, so SDPA needs no repeat_kv.
    qg = q.transpose(0, 1).reshape(1, KV, G * T, hd)  # [1, KV, G*T, hd], rows (g, t)
    ks, vs = kc[None, :, plan.read_lo:plan.read_hi], vc[None, :, plan.read_lo:plan.read_hi]  # [1, KV, S, hd]
    # 4-D inputs: on CPU only those reach the fused (flash) kernel; 3-D ones take the slower math path.
    o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=plan.mask, scale=hd ** -0.5)  # [1, KV, G*T, hd]
    return o.reshape(H, T, hd).transpose(0, 1).reshape(T, H * hd)


def flash_available(device: torch.device) -> bool:
    """True when flash-attn's kvcache kernel can be used on this device."""
    return cuda_library_imports(device, "flash_attn", "flash_attn_with_kvcache")


def triton_attention_available(device: torch.device) -> bool:
    """True when the Triton decode kernel can run on `device`: CUDA with triton importable, or (tests) any
    device once the kernels were built for Triton's interpreter. Imports triton only when it is installed."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return False
    if device.type != "cuda" and "triton" not in sys.modules:
        return False  # on CPU only an interpreter-mode import (made by the tests) makes the kernel usable
    from tiered.kernels import attention as ka

    return ka.triton is not None and (device.type == "cuda" or ka.interpreted())


def pick_backend(requested: str, device: torch.device, dtype: torch.dtype = torch.bfloat16, *,
                 sinks: bool = False) -> str:
    """Resolve --attn. "auto": on CUDA our Triton decode kernel when triton imports (one CUDA graph serves
    every length), else flash-attn when usable (fp16/bf16, importable), else SDPA; on CPU SDPA.
    "triton" and "flash" fail with a message when they cannot run. A model with attention sinks (`sinks`,
    gpt-oss) runs on SDPA: "auto" picks it (a note on stderr when it would have picked another on CUDA), and
    "triton" or "flash" fail with SINKS_NEED_SDPA."""
    if requested not in ATTN_BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {ATTN_BACKENDS}")
    if sinks and requested in ("triton", "flash"):
        raise ValueError(SINKS_NEED_SDPA)
    if requested == "sdpa":
        return "sdpa"
    if sinks:
        if device.type == "cuda":
            print("tiered: attention sinks (gpt-oss) run on the sdpa path: --attn auto picks sdpa (prompts in "
                  "bf16/fp16 take flash attention with the sink's correction, model/sinkflash.py)", file=sys.stderr)
        return "sdpa"
    if requested == "triton" or (requested == "auto" and device.type == "cuda"):
        if triton_attention_available(device):
            return "triton"
        if requested == "triton":
            raise ValueError("--attn triton needs a CUDA device and the triton package (it ships with torch's "
                             "CUDA wheels; pip install triton); use --attn sdpa (or auto)")
    ok = flash_available(device) and dtype in (torch.float16, torch.bfloat16)
    if requested == "flash" and not ok:
        raise ValueError("--attn flash needs a CUDA device, --dtype bfloat16 or float16 and an importable "
                         "flash_attn package; use --attn sdpa (or auto)")
    return "flash" if ok else "sdpa"


def _flash(q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int, plan: StepPlan,
           config: ModelConfig) -> Tensor:
    from flash_attn import flash_attn_with_kvcache

    T, H, hd = q.shape
    seqlens = plan.seqlens
    if seqlens is None:
        seqlens = torch.full((1,), int(plan.write_at), dtype=torch.int32, device=q.device)
    W = config.sliding_window
    # flash's window (left, right) counts keys strictly before the query: transformers' W is inclusive of it.
    out = flash_attn_with_kvcache(q[None], cache.k[layer], cache.v[layer], k=k[None], v=v[None],
                                 cache_seqlens=seqlens, softmax_scale=hd ** -0.5, causal=True,
                                 window_size=(W - 1, 0) if W else (-1, -1))
    return out.reshape(T, H * hd)
