"""Rotary inverse frequencies and the cos/sin scale for each supported `rope_type` (default, YaRN).

Owns: `inv_freq_and_scale(config, dim)`, the math of transformers' `modeling_rope_utils` for the types
tiered implements. Does not own: the cos/sin tables (layers.Rope builds them from these) nor applying them.

YaRN (gpt-oss, DeepSeek-V3): frequencies blended between interpolated (/factor) and original ones over the
correction range [low, high] of dimensions, and cos/sin scaled by the attention factor (0.1 ln(factor) + 1,
or the ratio of mscale / mscale_all_dim when both are given).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

ROPE_TYPES = ("default", "yarn")


def rope_kind(scaling: dict[str, Any] | None) -> str:
    return "default" if not scaling else (scaling.get("rope_type") or scaling.get("type") or "default")


def inv_freq_and_scale(theta: float, dim: int, scaling: dict[str, Any] | None, max_positions: int,
                       device: torch.device) -> tuple[Tensor, float]:
    """inv_freq [dim/2] fp32 on `device` and the factor cos/sin are multiplied by."""
    kind = rope_kind(scaling)
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim)
    if kind == "default":
        return 1.0 / base, 1.0
    if kind != "yarn":
        raise NotImplementedError(f"rope_scaling type {kind!r} ({scaling}) is not supported: tiered implements "
                                  f"{ROPE_TYPES}; add it to tiered/model/rope.py")
    s = scaling
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_positions / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        m, mall = s.get("mscale"), s.get("mscale_all_dim")
        attn = float(mscale(factor, m) / mscale(factor, mall)) if m and mall else mscale(factor)
    fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr(fast), corr(slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    extra = 1 - ramp  # weight of the original (extrapolated) frequencies
    inv = (1.0 / (factor * base)) * (1 - extra) + (1.0 / base) * extra
    return inv, float(attn)
