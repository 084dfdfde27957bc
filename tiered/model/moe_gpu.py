"""The CUDA expert paths of model/moe.py: the Triton MoE kernels over a provider's pool.

Owns: `kernels_enabled` (whether a model on this device uses the kernels), `experts_decode` (one token,
slot rows known: the fused decode kernel, graph-capturable) and `experts_tokens` (several tokens: the
decode kernel up to DECODE_MAX_T_FLOAT tokens, else rows grouped by expert with the provider's experts
in waves of `max_experts_per_call`, one grouped launch per projection per wave). A pool of quantized experts
(QuantWeight stacks, `quant_kernels_ok`) takes the fused dequantizing kernels on the same plan: the GEMV
kernels of kernels/quant_moe.py up to DECODE_MAX_T tokens, the grouped ones of kernels/quant_grouped.py above.
Does not own: the kernels (tiered/kernels), the plain torch paths (model/moe.py, which CPU keeps), where
experts live (the provider).

A provider may offer `slot_map(layer) -> int64 [E]` (every expert of the layer at hand, e.g. all resident):
then nothing here syncs with the host and the calls can be captured in CUDA graphs. Otherwise the distinct
experts are read back to the host once per layer, because the provider must know what to load.

Legend: T tokens, D hidden, K top-k, E experts per layer, U distinct experts.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import Tensor

from tiered.kernels import triton_available
from tiered.layout.quant import QuantWeight

# Up to this many tokens the decode kernels (one program set per (token, k)) beat the grouped kernels. Measured on
# the H200 at the 10.6B shape, uniform top-8 routing, timed in CUDA graphs (session 28, call C:
# benchmarks/results/batch-ahead-2026-12-03-h200-s28.json, us per layer, GEMV against grouped):
#   bf16: T 1 26.0 / 44.2, 2 46.7 / 69.6, 4 84.9 / 89.8, 8 160.7 / 144.4, 12 234.4 / 186.1, 16 307.0 / 201.3;
#   q4:   T 1 15.9 / 41.3, 2 27.5 / 63.1, 4 50.2 / 84.0, 8 92.3 / 124.8, 12 132.2 / 160.2, 16 171.1 / 176.7.
# So bf16 crosses over between 4 and 8 tokens; q4's GEMV stays ahead to 16 (kept at 8: the batch graphs' bucket 16
# would gain 3%, and the short-prompt paths above 8 tokens are tested on the grouped kernels).
DECODE_MAX_T = 8  # quantized experts
DECODE_MAX_T_FLOAT = 4  # bf16 / fp16 / fp32 experts (8 until session 28: T 8 took 156-188 us against 193 grouped
#                        in session 1, before the grouped kernel's tiles were tuned)
# mxfp4 experts cross over lower: at gpt-oss-20b's widths (D = F = 2880, top-4 of 32) batches of 8 rows ran 3,179 and
# 3,192 tok/s with the GEMVs against 3,607 and 3,598 grouped (1.13x; session 31 call E, a process each; q4 at that
# shape kept the GEMVs ahead: 5,037 in call C against 4,706 grouped in call D, the same box).
DECODE_MAX_T_MXFP4 = 4
DECODE_MAX_T_ENV = "TIERED_DECODE_MAX_T"  # a benchmark knob: one cut-over for all, to time it (docs/cli.md)


def decode_max_t(quant: bool = True, fmt: str | None = None) -> int:
    """The cut-over in force for quantized (or float) experts of format `fmt`: DECODE_MAX_T (DECODE_MAX_T_FLOAT;
    DECODE_MAX_T_MXFP4 for mxfp4), or TIERED_DECODE_MAX_T when set (read at each call: graphs keep what their capture
    read)."""
    raw = os.environ.get(DECODE_MAX_T_ENV, "").strip()
    if not raw:
        if not quant:
            return DECODE_MAX_T_FLOAT
        return DECODE_MAX_T_MXFP4 if fmt == "mxfp4" else DECODE_MAX_T
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{DECODE_MAX_T_ENV}={raw!r}: give a token count, e.g. 8") from None


def kernels_enabled(device: torch.device | str) -> bool:
    """True on CUDA with Triton installed; CPU keeps the plain torch path."""
    return triton_available(device)


def experts_decode(x: Tensor, slots: Tensor, weights: Tensor, W: Any, *, slot_base: int = 0,
                   round_to: torch.dtype | None = None, act: Any = None, wait: Any = None) -> Tensor:
    """x [T, D], slots [T, K] (or [K]) slot rows of W on x's device (rows slot_base + slots), weights [T, K]
    (rounded to `round_to` inside the kernel when given) -> [T, D] (no host sync). act: None (SwiGLU) or gpt-oss's
    ClampedSwiGLU; W's expert biases, where it has them, are applied. wait: moe_decode's (a Landing: misses the
    gather launched right before is still copying, T = 1)."""
    from tiered.kernels.moe_decode import moe_decode

    return moe_decode(x, slots, weights, W, slot_base=slot_base, round_to=round_to, act=act, wait=wait)


def quant_kernels_ok(W: Any) -> bool:
    """Whether the quantized kernels serve a pool of quantized experts (the fused formats, one layout for gate
    and up, on CUDA); otherwise model/moe.py dequantizes one expert at a time (its reference path)."""
    from tiered.kernels.quant_grouped import qgrouped_ok

    return qgrouped_ok(W)


def _decode_float(x: Tensor, slots: Tensor, weights: Tensor, W: Any, act: Any = None) -> Tensor:
    from tiered.kernels.moe_decode import moe_decode

    return moe_decode(x, slots, weights, W, act=act)


def _decode_quant(x: Tensor, slots: Tensor, weights: Tensor, W: Any, act: Any = None) -> Tensor:
    """A few tokens over quantized experts: the one-token GEMV kernels over T*K (token, expert) pairs (gpt-oss's
    activation and biases where W has them)."""
    from tiered.kernels.quant_moe import quant_down, quant_gate_up

    b = getattr(W, "gate_bias", None)
    h = quant_gate_up(x, slots, W.gate, W.up, act=act, biases=None if b is None else (b, W.up_bias))  # [T*K, F]
    return quant_down(h, slots, weights, W.down, x.dtype, early=True,  # gate_up launched right before
                      bias=None if b is None else W.down_bias)


def _grouped(x: Tensor, ids: Tensor, weights: Tensor, num_experts: int, W: Any):
    """The grouped run for the pool's format: bf16/fp16/fp32 elements or quantized stacks."""
    if isinstance(W.gate, QuantWeight):
        from tiered.kernels.quant_grouped import QuantGroupedMoE

        return QuantGroupedMoE(x, ids, weights, num_experts, W.gate.fmt)
    from tiered.kernels.moe_grouped import GroupedMoE

    return GroupedMoE(x, ids, weights, num_experts)


def _wave_map(provider: Any, layer: int, part: Tensor, num_experts: int, device: torch.device) -> Tensor:
    """provider.get() for the experts `part` [U] -> slot_map [E] int64 (-1 for experts not in `part`)."""
    slots = provider.get(layer, part)  # pinned until the next get()
    m = torch.full((num_experts,), -1, dtype=torch.int64, device=device)
    return m.index_copy_(0, part.to(device), slots.to(device=device, dtype=torch.int64))


def experts_tokens(x: Tensor, ids: Tensor, weights: Tensor, provider: Any, layer: int,
                   num_experts: int, act: Any = None) -> Tensor:
    """x [T, D], ids [T, K] experts, weights [T, K] -> [T, D], experts from `provider`. act: None (SwiGLU) or
    gpt-oss's ClampedSwiGLU; the pool's biases, where it has them, are applied (both kernel families compute them).

    Each wave's kernels are enqueued before the next get(), as model/moe.py's torch loop does.
    """
    W, dev, T = provider.weights, x.device, x.shape[0]
    quant = isinstance(W.gate, QuantWeight)
    cut = decode_max_t(quant, W.gate.fmt if quant else None)
    decode = functools.partial(_decode_quant if quant else _decode_float, act=act)
    whole = getattr(provider, "slot_map", None)
    if whole is not None:
        slot_map = whole(layer).to(device=dev, dtype=torch.int64)  # [E]
        if T <= cut:
            return decode(x, slot_map[ids], weights, W)
        run = _grouped(x, ids, weights, num_experts, W)
        run.wave(W, slot_map, act)
        return run.result()
    used = torch.unique(ids.reshape(-1))  # [U] sorted distinct experts (one host sync)
    n = max(1, int(provider.max_experts_per_call))
    U = used.numel()
    if T <= cut and U <= n:
        return decode(x, _wave_map(provider, layer, used, num_experts, dev)[ids], weights, W)
    run = _grouped(x, ids, weights, num_experts, W)
    for w0 in range(0, U, n):
        part = used[w0:w0 + n]
        slot_map = _wave_map(provider, layer, part, num_experts, dev)
        if w0 + n < U:
            provider.prefetch(layer, used[w0 + n:w0 + 2 * n])
        run.wave(W, slot_map, act)
    return run.result()
