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
    layers.{l}.o_bias [D], layers.{l}.sinks [H], layers.{l}.router_bias [E]   (gpt-oss)
    layers.{l}.q_proj is [2*H*hd, D] with `attn_output_gate` (per head: hd query rows, then hd gate rows)
Linear-attention (Gated DeltaNet) layers, `layer_types[l] == "linear"`, have no q/k/v/o and q/k norms, but:
    layers.{l}.lin_qkv [C, D] (C = 2*Hk*dk + Hv*dv), lin_z [Hv*dv, D], lin_b / lin_a [Hv, D],
    lin_conv [C, 1, W], lin_A_log [Hv], lin_dt_bias [Hv], lin_norm [dv], lin_out [D, Hv*dv]
    (Qwen3-Next stores lin_qkvz [2C', D] and lin_ba [2Hv, D] interleaved per key head instead of lin_qkv/z/b/a.)
Routed expert roles (tensors inside one expert block): gate [F, D], up [F, D], down [D, F]; with expert biases
(gpt-oss) also gate_bias [F], up_bias [F], down_bias [D]. A fused gate_up [2F, D] (FUSED_EXPERT_ROLES) is split
by byte range at repack; other source forms (transposed, interleaved, MXFP4) are turned into these at repack
(layout/fused.py).
Multi-head latent attention layers, `layer_types[l] == "mla"` (DeepSeek-V3; dims in extra["mla"]), instead of q/k/v:
    layers.{l}.mla_q_a [Rq, D], mla_q_a_norm [Rq], mla_q_b [H*(dn+dr), Rq] (or mla_q [H*(dn+dr), D] without q lora),
    mla_kv_a [R+dr, D], mla_kv_a_norm [R], mla_kv_b [H*(dn+dv), R], and o_proj [D, H*dv].
Dense decoder layers (l < extra["first_k_dense_replace"], DeepSeek-V3) have an MLP instead of router and experts:
    layers.{l}.dense_gate / dense_up [I, D], dense_down [D, I]; their expert blocks in the store are zeros.
The DeepSeek-V3 router adds layers.{l}.router_score_bias [E] (e_score_correction_bias, the choice only).
`extra` (family data the model reads): router ("softmax_topk" | "topk_softmax", model/routing.py), layer_types
(per-layer "sliding_attention" / "full_attention"), swiglu_limit / swiglu_alpha (clamped SwiGLU), rope_dim.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

EXPERT_ROLES = ("gate", "up", "down")
FUSED_EXPERT_ROLES = {"gate_up": ("gate", "up")}  # a checkpoint tensor holding several roles, split in this order
# full softmax attention over a KV cache; Gated DeltaNet over a fixed state; multi-head latent attention (DeepSeek-V3)
# over a cache of compressed latents
LAYER_KINDS = ("attention", "linear", "mla")


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
    layer_types: tuple[str, ...] = ()  # per layer, one of LAYER_KINDS; () = every layer is "attention"
    attn_output_gate: bool = False  # attention output times sigmoid(gate), gate rows in q_proj (Qwen3.5)
    partial_rotary_factor: float = 1.0  # share of each head's dims that get rotary (Qwen3.5: 0.25)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1.0 for zero-centred norms (Qwen3.5)
    linear_num_key_heads: int = 0  # Hk of the DeltaNet layers (0 when there are none)
    linear_num_value_heads: int = 0  # Hv
    linear_key_head_dim: int = 0  # dk
    linear_value_head_dim: int = 0  # dv
    linear_conv_kernel: int = 0  # W, the causal conv's kernel length

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for num_layers={self.num_layers}")
            bad = set(self.layer_types) - set(LAYER_KINDS)
            if bad:
                raise ValueError(f"layer_types {sorted(bad)} are not among {LAYER_KINDS}")
        if self.num_linear_layers and not (self.linear_num_key_heads and self.linear_num_value_heads
                                           and self.linear_key_head_dim and self.linear_value_head_dim
                                           and self.linear_conv_kernel):
            raise ValueError("linear-attention layers need linear_num_key_heads, linear_num_value_heads, "
                             "linear_key_head_dim, linear_value_head_dim and linear_conv_kernel")
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

    # --- layer kinds and per-sequence state ---
    def layer_kind(self, layer: int) -> str:
        """"attention" or "linear" (Gated DeltaNet)."""
        return self.layer_types[layer] if self.layer_types else "attention"

    @property
    def num_attention_layers(self) -> int:
        return sum(self.layer_kind(l) == "attention" for l in range(self.num_layers))

    @property
    def num_linear_layers(self) -> int:
        return sum(self.layer_kind(l) == "linear" for l in range(self.num_layers))

    @property
    def num_mla_layers(self) -> int:
        return sum(self.layer_kind(l) == "mla" for l in range(self.num_layers))

    @property
    def mla_latent_dim(self) -> int:
        """Values cached per token and MLA layer: kv_lora_rank + qk_rope_head_dim (0 without MLA)."""
        m = self.extra.get("mla") or {}
        return int(m.get("kv_lora_rank", 0)) + int(m.get("qk_rope_head_dim", 0))

    @property
    def first_moe_layer(self) -> int:
        """Layers before this one are dense (an MLP, no experts: DeepSeek-V3's first_k_dense_replace)."""
        return int(self.extra.get("first_k_dense_replace", 0) or 0)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_moe_layer

    @property
    def moe_layers(self) -> list[int]:
        """The layers that route to experts, in order: what traces and predictors index (their layer l is
        model layer moe_layers[l])."""
        return [l for l in range(self.num_layers) if self.is_moe_layer(l)]

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that get rotary (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_conv_dim(self) -> int:
        """C: the DeltaNet conv's channels (q, k and v)."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + \
            self.linear_num_value_heads * self.linear_value_head_dim

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes one more token of context costs: K and V over the attention layers, the latent (kv_lora_rank +
        qk_rope_head_dim) over the MLA layers (the caches that grow)."""
        return (2 * self.num_attention_layers * self.num_kv_heads * self.head_dim
                + self.num_mla_layers * self.mla_latent_dim) * itemsize

    def state_bytes_per_sequence(self, itemsize: int) -> int:
        """Fixed bytes per sequence of the DeltaNet layers: conv state in the compute dtype, recurrent state fp32."""
        conv = self.linear_conv_dim * max(self.linear_conv_kernel - 1, 0) * itemsize
        rec = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim * 4
        return self.num_linear_layers * (conv + rec)

    def with_experts_per_token(self, k: int) -> "ModelConfig":
        """The same model routing each token to `k` experts instead of its native top_k (--experts-per-token).

        The router's rule is unchanged (model/routing.py): its top k of the same scores, renormalised to sum 1
        when the family renormalises (norm_topk_prob), else the raw probabilities of the k kept. The native
        count is kept in extra["native_top_k"]. Raises ValueError when k is not in 1..num_experts.
        """
        k = int(k)
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"--experts-per-token {k} must be in 1..{self.num_experts} (this model's experts per "
                             f"layer; its native top-k is {self.top_k})")
        native = int(self.extra.get("native_top_k", self.top_k))
        return dataclasses.replace(self, top_k=k, extra={**self.extra, "native_top_k": native})

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["layer_types"] = list(self.layer_types)
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
