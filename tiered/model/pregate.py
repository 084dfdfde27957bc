"""Pre-gated experts asked into L2 during the attention (the one-token decode, every expert resident on the GPU).

Owns: `enabled()` (TIERED_PREGATE), `PregateTarget` (what a layer's qk_rope launch needs to ask L2 for the experts
its router will likely pick), `guess_rows` and `attach(model)`.
Does not own: the kernel (kernels/fused_rope.py's pregate programs, pdl.l2_bulk), the router, the expert kernels, the
expert pool (store/resident.py).

Why (notes/Q4_DECODE.md, session 49): a token's 8 q4 experts at the 10.6B shape (gate_up and down, 21 MB) take
12.4-13.5 us read from HBM and 10.3-10.4 us from L2 (tools/l2_experts_probe.py, H100), and the step reads them once
a token, so from HBM. The attention before them (q/k rope, split, combine, o_proj: about 13 us) leaves HBM mostly
idle. Layer l's router applied to the hidden state before the attention picks 78% of the experts it picks after it
(olmoe-code-17m on eval/: 0.41 at layer 0, 0.77-0.90 at layers 1-7).

How: the router's rows, each input scaled by mlp_norm / attn_norm, are appended to the layer's qkv matrix as E more
output rows (in qkv's format: quantized like it, or plain), so the qkv GEMV also computes
    guess = W_r (mlp_norm * n(h))     where the router computes     W_r (mlp_norm * n(h + attention))
(n: the rms normalisation, whose positive scale does not change the order). The q/k rope launch then runs G x C more
programs: program p takes the guess's (p mod G)-th best expert and asks L2 for the (p div G)-th of C chunks of its
block of the pool (cp.async.bulk.prefetch.L2, in 128 pieces). The expert kernels, four launches later, find those
bytes in L2. Nothing the model computes changes: q, k, v are the same columns, the router is unchanged, and a wrong
guess costs only HBM bandwidth.
Measured (session 49, H100, `benchmarks/results/pregate-2026-12-06-h100-s49.json`): the q4+q4 VRAM decode of the
8-layer 10.6B shape 2,647.2 / 2,646.8 tok/s with it against 2,784.4 / 2,791.7 without (0.949x), so it is off by
default. The timeline says where: gate_up adds 7.01 us a layer against 8.21 (the guess names 43% of that random-weight
model's experts), but qk_rope adds 6.53 against 1.69: its span grows by about the time HBM needs for the 21.6 MB
asked for, so its programs probably do not exit before their bulk prefetches complete (not verified). What would
make it pay: line prefetches (prefetch.global.L2, fire and forget) in place of the bulk copies, the selection by
rank in one warp, and a model whose guess is as good as the reference model's (78%).
When: CUDA, the glue kernels, a ResidentExperts provider whose pool is on the device, no routing override; per layer:
attention (no output gate) and a MoE layer whose router takes the router kernel (plain softmax-top-k). G = top-k;
G blocks must fit half the device's L2 (q4 at the 10.6B shape: 8 x 2.7 MB; bf16's 8 x 9.4 MB do not).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from tiered.layout.quant import QuantWeight, cat_rows, quantize

ENV = "TIERED_PREGATE"
CHUNKS = 8  # programs an expert's block is split over


MODES = ("off", "bulk", "lines")


def mode() -> str:
    """TIERED_PREGATE: 0 / off (the default: bulk measured 0.949x, see above), 1 / bulk (cp.async.bulk prefetches of
    the guessed blocks) or lines (prefetch.global.L2 of each 128-byte line: no copy engine; not yet timed)."""
    v = os.environ.get(ENV, "0").strip().lower()
    named = {"0": "off", "off": "off", "": "off", "1": "bulk", "on": "bulk", "bulk": "bulk", "lines": "lines"}
    if v not in named:
        raise ValueError(f"{ENV}={v!r}: use 0 (off), 1 or bulk (bulk prefetches), or lines (line prefetches)")
    return named[v]


def enabled() -> bool:
    """Whether TIERED_PREGATE asks for the pre-gate (either prefetch)."""
    return mode() != "off"


@dataclass(frozen=True)
class PregateTarget:
    """A layer's guess and where its experts live: the guess logits at qkv columns col..col+experts-1; expert e's
    block is pool row row0 + e (uint8 [rows, block] on the device); `top` experts asked for, `chunks` programs each;
    `lines`: line prefetches in place of bulk copies (TIERED_PREGATE=lines)."""
    col: int
    experts: int
    top: int
    chunks: int
    pool: Tensor
    row0: int
    lines: bool = False


def guess_rows(router: Tensor, attn_norm: Tensor, mlp_norm: Tensor) -> Tensor:
    """fp32 [E, D]: the router's rows with input d scaled by mlp_norm[d] / attn_norm[d], so that these rows applied to
    the attention's normed input give the router's logits on the pre-attention state (up to a positive scale).
    Inputs whose attn_norm is 0 carry nothing there: their column is 0."""
    a = attn_norm.float()
    ratio = torch.where(a.abs() > 1e-12, mlp_norm.float() / torch.where(a == 0, torch.ones_like(a), a),
                        torch.zeros_like(a))
    return router.float() * ratio[None, :]


def _append(qkv: Tensor | QuantWeight, rows: Tensor) -> Tensor | QuantWeight:
    if isinstance(qkv, QuantWeight):
        return cat_rows([qkv, quantize(rows.to(qkv.device), qkv.fmt)])
    return torch.cat([qkv, rows.to(qkv.device, qkv.dtype)], dim=0)


def attach(model) -> int:
    """Appends the guess rows to every eligible layer's qkv and sets its AttnWeights.pregate (see the module's
    "When"); returns how many layers got it (0: the model does not qualify, nothing changed)."""
    from tiered.store.resident import ResidentExperts

    prov, cfg = model.provider, model.config
    pool = getattr(prov, "pool", None)
    if (not isinstance(prov, ResidentExperts) or pool is None or pool.device.type != "cuda" or not model.glue
            or getattr(model, "_routing", None) is not None or cfg.attn_output_gate or cfg.num_experts < cfg.top_k):
        return 0
    if (pool.dim() != 2 or pool.dtype != torch.uint8 or pool.shape[0] != prov.num_layers * prov.num_experts
            or prov.num_layers != cfg.num_layers):
        return 0
    l2 = torch.cuda.get_device_properties(pool.device).L2_cache_size
    if cfg.top_k * pool.shape[1] > l2 // 2:
        return 0
    E = prov.num_experts
    lines = mode() == "lines"
    n = 0
    for l, lw in enumerate(model.layers):
        if lw.attn is None or lw.moe is None or not model._router_layers[l]:
            continue
        guess = guess_rows(lw.moe.router, lw.attn_norm, lw.mlp_norm)
        col = lw.attn.qkv.shape[0]
        bias = lw.attn.qkv_bias
        if bias is not None:
            bias = torch.cat([bias, torch.zeros(E, dtype=bias.dtype, device=bias.device)])
        target = PregateTarget(col=col, experts=E, top=cfg.top_k, chunks=CHUNKS, pool=pool, row0=l * E,
                               lines=lines)
        attn = dataclasses.replace(lw.attn, qkv=_append(lw.attn.qkv, guess), qkv_bias=bias, pregate=target)
        model.layers[l] = dataclasses.replace(lw, attn=attn)
        n += 1
    return n
