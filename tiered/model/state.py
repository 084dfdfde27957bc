"""Per-layer sequence state: what each decoder layer keeps between forward calls of one sequence.

Owns: `ModelState`, allocated once per model: the KV cache rows of the attention layers (`KVCache`, which grows
with context up to max_context) and, for Gated DeltaNet layers, a conv state and a recurrent state of fixed
size (they do not grow with context). Also `row(l)` (layer -> its row in the KV cache or in the linear
state), `reset()` (a new sequence), `snapshot()` / `restore()` (CUDA-graph warm-ups run the step for real
and must not advance the recurrent state), and the byte counts `inspect` and the budget planner report.
MLA layers (DeepSeek-V3) keep `latent`, an MLACache (model/mla.py): per position the normed kv latent and the
shared rotary key, position-addressed like KV rows (it grows with context, (R + dr) values per token and layer).
Does not own: the math that reads and writes the state (layers.py, deltanet.py, mla.py).

The seam for a batch scheduler (notes/SEAMS.md): one sequence's state is the KV rows it owns plus, per
linear layer, conv [C, W-1] and recurrent [Hv, dk, dv] tensors; every tensor here has a leading per-layer
dim, so a batched state is the same tensors with a sequence dim after it.

Legend: La attention layers, Ll linear layers, C conv channels, W conv kernel, Hv value heads,
dk/dv key/value head dims.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tiered.layout.config import ModelConfig
from tiered.model.layers import KVCache
from tiered.model.mla import MLACache, MLADims


@dataclass(frozen=True)
class LinearState:
    conv: Tensor  # [Ll, C, W-1] compute dtype: the last W-1 conv inputs
    recurrent: Tensor  # [Ll, Hv, dk, dv] fp32: the delta-rule state


def mla_dims(config: ModelConfig) -> MLADims:
    """The MLA dimensions of a DeepSeek-V3 config (ModelConfig.extra["mla"])."""
    m = config.extra["mla"]
    return MLADims(heads=config.num_heads, q_lora_rank=m.get("q_lora_rank"), kv_lora_rank=int(m["kv_lora_rank"]),
                   nope=int(m["qk_nope_head_dim"]), rope=int(m["qk_rope_head_dim"]), v=int(m["v_head_dim"]),
                   interleave=bool(config.extra.get("rope_interleave", True)), eps=config.rms_norm_eps)


class ModelState:
    """Every layer's state for one sequence; shapes fixed at allocation, updated in place (graph-capturable)."""

    def __init__(self, config: ModelConfig, max_context: int, *, device: torch.device, dtype: torch.dtype,
                 flash: bool = False, paged: bool = False) -> None:
        kinds = [config.layer_kind(l) for l in range(config.num_layers)]
        counts = {"attention": 0, "linear": 0, "mla": 0}
        rows = []
        for k in kinds:
            rows.append(counts[k])
            counts[k] += 1
        self.kinds = tuple(kinds)
        self.rows = tuple(rows)  # layer -> row in kv (attention) or linear (linear)
        self.kv = KVCache.allocate(config, max_context, device=device, dtype=dtype, flash=flash, paged=paged,
                                   layers=counts["attention"])
        self.latent: MLACache | None = None  # MLA layers (DeepSeek-V3): latent + rope key per position
        if counts["mla"]:
            self.latent = MLACache.allocate(counts["mla"], max_context, mla_dims(config), device=device, dtype=dtype)
        self.linear: LinearState | None = None
        if counts["linear"]:
            c = config
            self.linear = LinearState(
                conv=torch.zeros(counts["linear"], c.linear_conv_dim, c.linear_conv_kernel - 1, device=device,
                                 dtype=dtype),
                recurrent=torch.zeros(counts["linear"], c.linear_num_value_heads, c.linear_key_head_dim,
                                      c.linear_value_head_dim, device=device, dtype=torch.float32))

    def row(self, layer: int) -> int:
        return self.rows[layer]

    def reset(self) -> None:
        """Start a new sequence: zero the recurrent parts (KV rows are overwritten by position, no reset needed)."""
        if self.linear is not None:
            self.linear.conv.zero_()
            self.linear.recurrent.zero_()

    def snapshot(self) -> tuple[Tensor, Tensor] | None:
        """A copy of the state that is not addressed by position (the linear layers'); None when there is none."""
        if self.linear is None:
            return None
        return self.linear.conv.clone(), self.linear.recurrent.clone()

    def restore(self, snap: tuple[Tensor, Tensor] | None) -> None:
        if snap is not None:
            self.linear.conv.copy_(snap[0])
            self.linear.recurrent.copy_(snap[1])

    def nbytes(self) -> int:
        n = self.kv.k.nbytes + self.kv.v.nbytes
        if self.latent is not None:
            n += self.latent.latent.nbytes + self.latent.k_rope.nbytes
        if self.linear is not None:
            n += self.linear.conv.nbytes + self.linear.recurrent.nbytes
        return n
