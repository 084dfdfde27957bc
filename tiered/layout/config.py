"""The normalised model configuration: the one description of a model that the runtime reads.

Owns: `ModelConfig` (frozen, JSON round-trippable) and the canonical tensor names that the
layout stores dense weights under. Does not own: reading Hugging Face configs or tensor names
(that is `families.py`), nor cache budgets (that is `store/`).

Canonical dense tensor names (keys of `dense.safetensors` in a layout):
    embed                     [V, D]
    final_norm                [D]
    lm_head                   [V, D]      absent when `tie_word_embeddings`
    layers.{l}.attn_norm      [D]
    layers.{l}.q_proj         [H*hd, D]   (+ layers.{l}.q_bias when `attn_bias`)
    layers.{l}.k_proj         [KV*hd, D]  (+ k_bias)
    layers.{l}.v_proj         [KV*hd, D]  (+ v_bias)
    layers.{l}.o_proj         [D, H*hd]
    layers.{l}.q_norm         [hd] if qk_norm == "head", [H*hd] if "proj"
    layers.{l}.k_norm         [hd] if qk_norm == "head", [KV*hd] if "proj"
    layers.{l}.mlp_norm       [D]
    layers.{l}.router         [E, D]
    layers.{l}.shared_gate_proj / shared_up_proj [Fs, D], shared_down_proj [D, Fs]
    layers.{l}.shared_expert_gate [1, D]
Routed expert roles (tensors inside one expert block): gate [F, D], up [F, D], down [D, F].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

EXPERT_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class ModelConfig:
    family: str  # layout family name, e.g. "olmoe" (a file in layouts/)
    vocab_size: int  # V
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H, query heads
    num_kv_heads: int  # KV heads (grouped-query attention when < H)
    head_dim: int  # hd
    num_experts: int  # E, routed experts per layer
    top_k: int  # K, experts used per token and layer
    norm_topk_prob: bool  # renormalise the K routing weights to sum to 1
    expert_ffn: int  # F, a routed expert's intermediate size
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    shared_expert_ffn: int = 0  # Fs, 0 when the family has no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    qk_norm: str = "none"  # "none", "head" (per head, Qwen3-MoE) or "proj" (whole projection, OLMoE)
    attn_bias: bool = False  # q/k/v projections carry a bias (Qwen2-MoE)
    sliding_window: int | None = None  # attention window in tokens (Mixtral), None = full
    tie_word_embeddings: bool = False  # lm_head is the embedding matrix
    rope_scaling: dict[str, Any] | None = None  # only None / "default" is supported at run time
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-clip, clip]
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these
    source_dtype: str = "bfloat16"  # dtype of the weights as stored in the layout
    extra: dict[str, Any] = field(default_factory=dict)  # family hook data (DeepSeek groups, ...)

    def __post_init__(self) -> None:
        if self.qk_norm not in ("none", "head", "proj"):
            raise ValueError(f"qk_norm must be none/head/proj, got {self.qk_norm!r}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    # --- derived sizes (parameters, not bytes) ---
    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate + up + down."""
        return 3 * self.hidden_size * self.expert_ffn

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {sorted(unknown)}: the layout was written by a newer tiered")
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)
