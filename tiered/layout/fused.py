"""Expert tensors stored in a form other than tiered's gate/up/down: turned into canonical roles at repack.

Owns: `SOURCE_ROLES` (the source roles a family file may name besides gate/up/down) and `canonical_expert`,
which turns one expert's source tensors into the canonical roles of config.py: gate [F, D], up [F, D],
down [D, F], and, for families with expert biases, gate_bias [F], up_bias [F], down_bias [D].
Does not own: reading bytes (repack.py) nor the block layout (format.py).

Source forms:
- gpt-oss, unquantized: `gate_up_t` [D, 2F] (input-major, gate and up interleaved column by column),
  `gate_up_bias` [2F] (interleaved), `down_t` [F, D], `down_bias` [D].
- gpt-oss, MXFP4 (as published): `gate_up_blocks` [2F, D/32, 16] uint8 (two e2m1 values per byte, low nibble
  first), `gate_up_scales` [2F, D/32] uint8 (e8m0: 2^(s-127)), `down_blocks` [D, F/32, 16], `down_scales`
  [D, F/32]. With keep_mxfp4 they stay as stored (QuantWeight "mxfp4" over the same codes and scales: gate and
  up are the even and odd rows, whole rows of bytes); else they are dequantized here (the layout then holds them
  in the repack dtype, 4.25 bits -> 16 or 32 bits per weight: about 3.8x the bytes at bf16).

Legend: D hidden, F expert FFN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tiered.layout.quant import QuantWeight, from_mxfp4_checkpoint

SOURCE_ROLES = ("gate_up_t", "gate_up_bias", "down_t", "gate_up_blocks", "gate_up_scales", "down_blocks",
                "down_scales", "gate_bias", "up_bias", "down_bias")

# e2m1 code -> value (sign bit 3, exponent bits 2..1, mantissa bit 0)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def mxfp4_dequant(blocks: Tensor, scales: Tensor) -> Tensor:
    """blocks [R, G, 16] uint8, scales [R, G] uint8 -> fp32 [R, G*32]: value * 2^(scale - 127), each byte holding
    two consecutive values (low nibble first), as transformers' convert_moe_packed_tensors."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    R, G, B = blocks.shape
    lo, hi = (blocks & 0x0F).long(), (blocks >> 4).long()
    out = torch.stack([lut[lo], lut[hi]], dim=-1).reshape(R, G, 2 * B)  # [R, G, 32]
    out = torch.ldexp(out, (scales.to(torch.int32) - 127)[..., None])
    return out.reshape(R, G * 2 * B)


def mxfp4_quant(w: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse for tests and tools: fp32 [R, C] (C a multiple of 32) -> (blocks, scales), rounding each value
    to the nearest e2m1 code after dividing by its block's power-of-two scale (the largest |value| of the
    block maps to at most 6)."""
    R, C = w.shape
    g = w.float().reshape(R, C // 32, 32)
    amax = g.abs().amax(-1).clamp_min(2.0 ** -126)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scales = (e + 127).to(torch.uint8)
    q = g / torch.ldexp(torch.ones_like(e), e.int())[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (q[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [R, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), scales


def canonical_expert(src: dict[str, Tensor], *, keep_mxfp4: bool = False) -> dict[str, Tensor | QuantWeight]:
    """One expert's source tensors (roles of SOURCE_ROLES or canonical ones) -> canonical roles; MXFP4 ones as
    QuantWeight (the stored bytes, no dequantization) when keep_mxfp4, else dequantized to fp32."""
    out = {k: v for k, v in src.items() if k in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")}
    if "gate_up_t" in src:
        gu = src["gate_up_t"]  # [D, 2F]
        out["gate"], out["up"] = gu[:, 0::2].t().contiguous(), gu[:, 1::2].t().contiguous()
    if "gate_up_blocks" in src and keep_mxfp4:
        b, sc = src["gate_up_blocks"], src["gate_up_scales"]  # [2F, G, 16], [2F, G]
        out["gate"], out["up"] = (from_mxfp4_checkpoint(b[i::2].contiguous(), sc[i::2].contiguous()) for i in (0, 1))
    elif "gate_up_blocks" in src:
        gu = mxfp4_dequant(src["gate_up_blocks"], src["gate_up_scales"])  # [2F, D]
        out["gate"], out["up"] = gu[0::2].contiguous(), gu[1::2].contiguous()
    if "gate_up_bias" in src:
        b = src["gate_up_bias"]
        out["gate_bias"], out["up_bias"] = b[0::2].contiguous(), b[1::2].contiguous()
    if "down_t" in src:
        out["down"] = src["down_t"].t().contiguous()  # [F, D] -> [D, F]
    if "down_blocks" in src and keep_mxfp4:
        out["down"] = from_mxfp4_checkpoint(src["down_blocks"].contiguous(), src["down_scales"].contiguous())
    elif "down_blocks" in src:
        out["down"] = mxfp4_dequant(src["down_blocks"], src["down_scales"])  # [D, F]
    missing = [r for r in ("gate", "up", "down") if r not in out]
    if missing:
        raise ValueError(f"expert source roles {sorted(src)} give no {missing}: the family file's [experts] "
                         "section is incomplete")
    return out
