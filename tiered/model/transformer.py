"""The decoder: one implementation for every MoE family, its differences read from ModelConfig.

Owns: `Transformer` (weights per layer built from the canonical dense dict, the rotary tables and the
KV cache, allocated once), its eager `forward` over T tokens at a start position,
`decode_static`, a one-token step whose positions are device tensors so that it can be captured in
a CUDA graph (no host sync, no allocation that depends on the position), and the same step cut into
L+1 segments at the routers (`segment_first/mid/last`, `Routed`), which tiered/decode/piecewise.py runs with
the routing read on the host between segments.
Does not own: expert weights (an ExpertProvider hands them out), sampling or the generation loop
(engine.py, decode/), reading layouts (store/disk.py), the routing override (predict/replay.py).

Family differences, all from ModelConfig: qkv bias (Qwen2-MoE), q/k norm per head (Qwen3-MoE) or
over the projection (OLMoE), clip_qkv (OLMoE), sliding window (Mixtral), top-k renormalisation,
shared expert with sigmoid gate (Qwen2-MoE), tied embeddings; gpt-oss: o_proj bias, attention sinks, sliding
and full layers mixed (extra["layer_types"]), router bias with the top-k-then-softmax rule, expert biases and
the clamped SwiGLU, YaRN rope (model/rope.py); per-layer kinds (Qwen3.5-MoE / Qwen3-Next, ModelConfig.layer_types:
Gated DeltaNet layers between gated, partially rotary attention layers, zero-centred norms).
Every layer's state between calls (KV rows, DeltaNet conv and recurrent state) is a `ModelState`
(model/state.py); a call at position 0 starts a new sequence and resets the recurrent part.

The glue between the GEMVs (`glue`, on by default on CUDA): each layer's residual add and the norm after it are one
Triton launch (kernels/fused_norm.py; the add of layer l's expert output is fused with layer l+1's attention norm,
which is why `attend_route` takes the previous layer's output as `delta`), the q/k norms, rotary and K/V store one
(layers.project_qkv_fused), and the softmax-top-k router one (kernels/fused_route.py). Same roundings as the torch
ops they replace, which the CPU path keeps.

Legend: T tokens, D hidden, V vocab, L layers, S cache positions.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.kernels import cpu_kernel
from tiered.kernels.quant_moe import qlinear as linear
from tiered.layout.config import ModelConfig
from tiered.layout.quant import QuantWeight, cat_rows
from tiered.layout.quant import dense as qdense
from tiered.model.deltanet import DeltaShape, DeltaWeights, deltanet, pick_delta_backend, pick_delta_step
from tiered.model.layers import (SINKS_NEED_SDPA, AttnWeights, KVCache, Rope, StepPlan, attention, attn_mask,
                                 glue_available, kernel_capacity, plan_eager, rms_norm)
from tiered.model import moe_gpu
from tiered.model.moe import (FP32_ROUTE_WEIGHTS, ExpertProvider, MoEWeights, PrefetchHook, RoutingObserver,
                               ClampedSwiGLU, expert_mix, route, routed_logits)
from tiered.model.mla import MLAWeights, mla_attention, mla_softmax_scale
from tiered.model.routing import layer_rule, route_rule, softmax_topk
from tiered.model.state import ModelState, mla_dims
from tiered.store.options import EMBED_PLACES, TIED_EMBED_HOST


class RoutingOverride(Protocol):
    """Routing chosen outside the model (benchmark mode: predict/replay.py replays a recorded trace).

    __call__(layer, start, T) -> (ids [T, K] int64, weights [T, K] fp32) on the model's device, replacing the
    router's top-k for positions start..start+T-1. host(layer, start, T) -> the same rows as CPU tensors, so
    the piecewise step reads them without a device sync."""

    def __call__(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]: ...

    def host(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Routed:
    """Layer l after its attention and router: what the host reads between decode segments, and what
    layer l's expert computation needs."""
    h: Tensor  # [T, D] residual stream after layer l's attention (the observer's `hidden`)
    x: Tensor  # [T, D] post-attention norm of h (the experts' input)
    logits: Tensor  # [T, E] router logits, compute dtype
    ids: Tensor  # [T, K] int64 top-k experts, router order
    weights: Tensor  # [T, K] float32 routing weights (renormalised when the family does)
    # True: ids and weights are not written yet; the kernel after the router computes the top-k from `logits`
    # (attend_route's defer_topk: the device step's resolve, kernels/slot_table.resolve(topk=...))
    topk_pending: bool = False
    # True: the router's launch also wrote the chosen experts' slots of a complete device slot table (attend_route's
    # lookup)
    looked_up: bool = False


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: Tensor  # [D] (fp32 1 + w for zero-centred norms)
    attn: AttnWeights | None  # attention layers
    mlp_norm: Tensor  # [D]
    moe: MoEWeights | None  # None for a dense layer (DeepSeek-V3's first layers)
    linear: DeltaWeights | None = None  # Gated DeltaNet layers
    mla: MLAWeights | None = None  # multi-head latent attention layers (DeepSeek-V3)
    dense_mlp: tuple[Tensor, Tensor, Tensor] | None = None  # gate [I, D], up [I, D], down [D, I] of a dense layer


def _take(dense: dict[str, Tensor | QuantWeight], name: str, device: torch.device, dtype: torch.dtype,
          required: bool = True, keep: bool = False) -> Tensor | QuantWeight | None:
    """A dense weight on `device`: in the compute dtype, or kept quantized (dequantized on use by `linear`).
    keep (matrices only `linear` reads): a bf16 / fp16 matrix under fp32 compute on the CPU stays as stored when the
    native kernel is there (qlinear reads it with the native GEMV, widening exactly: half the bytes a token, the
    same sums)."""
    t = dense.get(name)
    if t is None:
        if required:
            raise KeyError(f"dense tensor {name!r} is missing from the layout: re-run tiered repack "
                           "(the layout file for this family may lack the name)")
        return None
    if isinstance(t, QuantWeight):
        return t.to_device(device)
    if (keep and device.type == "cpu" and dtype == torch.float32 and t.dtype in (torch.bfloat16, torch.float16)
            and cpu_kernel.shared() is not None):
        return t.to(device=device)
    return t.to(device=device, dtype=dtype)


def _cat_rows(ws: list[Tensor | QuantWeight], dtype: torch.dtype) -> Tensor | QuantWeight:
    """q, k and v stacked into one matrix along the output rows: quantized parts stacked, plain matrices of one
    dtype (the compute dtype, or all kept as stored) concatenated, a mix in the compute dtype `dtype`."""
    if all(isinstance(w, QuantWeight) for w in ws):
        return cat_rows(ws)
    if all(isinstance(w, Tensor) for w in ws) and len({w.dtype for w in ws}) == 1:
        return torch.cat(ws, dim=0)
    return torch.cat([w.dequantize(dtype) if isinstance(w, QuantWeight) else w.to(dtype) for w in ws], dim=0)


def _split_output_gate(q: Tensor | QuantWeight, H: int, hd: int, dtype: torch.dtype) -> tuple[Tensor | QuantWeight, ...]:
    """q_proj [2*H*hd, D] holding, per head, hd query rows then hd output-gate rows (Qwen3.5) -> (q [H*hd, D],
    gate [H*hd, D]). A quantized q_proj with per-row groups (q8, q4) splits its parts the same way; fp8's 128-row
    scale blocks may straddle the split, so it is dequantized first (--dense does not offer fp8)."""
    def split(t: Tensor) -> tuple[Tensor, Tensor]:  # t [2*H*hd, X]
        a, b = t.reshape(H, 2, hd, t.shape[-1]).unbind(1)
        return a.reshape(H * hd, -1), b.reshape(H * hd, -1)

    if not isinstance(q, QuantWeight):
        return split(q)
    if q.fmt == "fp8":
        return split(q.dequantize(dtype))
    halves = {name: split(t) for name, t in q.parts().items()}
    return tuple(QuantWeight(q.fmt, (H * hd, q.matrix[1]), q.group, **{n: h[i] for n, h in halves.items()})
                 for i in (0, 1))


def norm_weight(cfg: ModelConfig, t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """An RMSNorm scale as the model applies it: the compute dtype, or for zero-centred norms (norm_offset)
    offset + w in fp32, which is how transformers' Qwen3.5 norm scales (in fp32, before the cast back)."""
    if cfg.norm_offset:
        return t.to(device=device, dtype=torch.float32) + cfg.norm_offset
    return t.to(device=device, dtype=dtype)


def build_layer(cfg: ModelConfig, dense: dict[str, Tensor], l: int, device: torch.device,
                dtype: torch.dtype) -> LayerWeights:
    """Layer l's dense weights in the compute dtype on `device` (quantized ones as stored; on a CPU under fp32 the
    bf16 attention projections too: `_take`'s keep); q/k/v stacked into one matrix."""
    p = f"layers.{l}."

    def t(name: str, required: bool = True, keep: bool = False) -> Tensor | None:
        return _take(dense, p + name, device, dtype, required, keep)

    def nw(name: str) -> Tensor:
        return norm_weight(cfg, t(name), device, dtype)

    act = None
    if "swiglu_limit" in cfg.extra:
        act = ClampedSwiGLU(alpha=float(cfg.extra.get("swiglu_alpha", 1.702)), limit=float(cfg.extra["swiglu_limit"]))
    shared = cfg.shared_expert_ffn > 0
    moe = dense_mlp = None
    if cfg.is_moe_layer(l):
        bias = _take(dense, p + "router_score_bias", device, torch.float32, False)
        moe = MoEWeights.stacked(router=t("router"),
                                 shared_gate=t("shared_gate_proj") if shared else None,
                                 shared_up=t("shared_up_proj") if shared else None,
                                 shared_down=t("shared_down_proj") if shared else None,
                                 shared_expert_gate=(t("shared_expert_gate") if shared and cfg.shared_expert_gate
                                                     else None),
                                 router_bias=t("router_bias", False), act=act, score_bias=bias)
    else:
        dense_mlp = (t("dense_gate"), t("dense_up"), t("dense_down"))
    if cfg.layer_kind(l) == "mla":
        q_a = t("mla_q_a", False)
        mla = MLAWeights(q_a=q_a, q_a_norm=t("mla_q_a_norm") if q_a is not None else None,
                         q_b=t("mla_q_b") if q_a is not None else t("mla_q"), kv_a=t("mla_kv_a"),
                         kv_a_norm=t("mla_kv_a_norm"), kv_b=qdense(t("mla_kv_b"), dtype), o=t("o_proj"))
        return LayerWeights(attn_norm=nw("attn_norm"), attn=None, mlp_norm=nw("mlp_norm"), moe=moe, mla=mla,
                            dense_mlp=dense_mlp)
    if cfg.layer_kind(l) == "linear":
        return LayerWeights(attn_norm=nw("attn_norm"), attn=None, mlp_norm=nw("mlp_norm"), moe=moe,
                            linear=build_deltanet(cfg, dense, l, device, dtype))
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = t("q_proj", keep=True)
    gate = None
    if cfg.attn_output_gate:  # per head: hd query rows then hd gate rows
        q, gate = _split_output_gate(q, H, hd, dtype)
    qkv = _cat_rows([q, t("k_proj", keep=True), t("v_proj", keep=True)] + ([gate] if gate is not None else []),
                    dtype)
    bias = None
    if cfg.attn_bias:
        bias = torch.cat([t("q_bias"), t("k_bias"), t("v_bias")], dim=0)
    q_norm = k_norm = None
    if cfg.qk_norm == "proj":
        q_norm, k_norm = t("q_norm"), t("k_norm")
    elif cfg.qk_norm == "head":  # one [H+KV, hd] table, so q and k are normed in one call
        q_norm = torch.cat([nw("q_norm").expand(H, hd), nw("k_norm").expand(KV, hd)], dim=0)
    sinks = t("sinks", False)
    attn = AttnWeights(qkv=qkv, qkv_bias=bias, o=t("o_proj", keep=True), q_norm=q_norm, k_norm=k_norm,
                       o_bias=t("o_bias", False), sinks=None if sinks is None else sinks.float(),
                       qk_cat=torch.cat([q_norm, k_norm]) if cfg.qk_norm == "proj" else None)
    return LayerWeights(attn_norm=nw("attn_norm"), attn=attn, mlp_norm=nw("mlp_norm"), moe=moe, dense_mlp=dense_mlp)


def build_deltanet(cfg: ModelConfig, dense: dict[str, Tensor], l: int, device: torch.device,
                   dtype: torch.dtype) -> DeltaWeights:
    """Layer l's Gated DeltaNet weights; Qwen3-Next's per-key-head interleaved lin_qkvz / lin_ba are
    de-interleaved here into the q|k|v, z, b, a blocks that Qwen3.5 stores."""
    p = f"layers.{l}."

    def t(name: str, required: bool = True) -> Tensor | None:
        return _take(dense, p + name, device, dtype, required)

    Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    if p + "lin_qkvz" in dense:
        G = Hv // Hk
        qkvz = t("lin_qkvz").view(Hk, 2 * dk + 2 * G * dv, -1)  # per key head: q, k, G value heads, G gates
        q, k, v, z = qkvz.split([dk, dk, G * dv, G * dv], dim=1)
        qkv = torch.cat([x.reshape(-1, x.shape[-1]) for x in (q, k, v)], dim=0)
        z = z.reshape(Hv * dv, -1)
        b, a = t("lin_ba").view(Hk, 2 * G, -1).split([G, G], dim=1)
        b, a = b.reshape(Hv, -1), a.reshape(Hv, -1)
    else:
        qkv, z, b, a = t("lin_qkv"), t("lin_z"), t("lin_b"), t("lin_a")
    return DeltaWeights.stacked(qkv=qkv, z=z, b=b, a=a, conv=t("lin_conv").reshape(cfg.linear_conv_dim, -1),
                                A_log=_take(dense, p + "lin_A_log", device, torch.float32), dt_bias=t("lin_dt_bias"),
                                norm=t("lin_norm"), out=t("lin_out"))


class Transformer:
    """A decoder whose pools (KV cache, rotary tables, dense weights) are allocated once, at construction."""

    def __init__(self, config: ModelConfig, dense: dict[str, Tensor], provider: ExpertProvider, *,
                 device: torch.device | str, dtype: torch.dtype, max_context: int, attn: str = "sdpa",
                 observer: RoutingObserver | None = None, prefetch_hook: PrefetchHook | None = None,
                 routing: RoutingOverride | None = None, kernels: bool | None = None,
                 linear_attn: str = "auto", delta_step: str = "auto", glue: bool | None = None,
                 embed: str = "gpu") -> None:
        """observer: sees every layer's routing (SEAMS.md). prefetch_hook: called per layer of one-token steps
        after that layer's get() (moe.PrefetchHook). routing: replaces the router's choice (benchmark mode).
        kernels: routed experts through the Triton kernels (None = on CUDA when Triton is installed).
        All four are fixed for the model's life. linear_attn: the DeltaNet backend ("auto", "fla", "torch");
        delta_step: its one-token step ("auto", "triton", "fla", "torch"; deltanet.pick_delta_step).
        glue: norms, residual adds, q/k norm + rotary + K/V store and softmax-top-k routing through the fused
        Triton kernels (None = on CUDA when Triton is installed; False = the torch ops, the CPU path).
        embed: where the token-embedding table lives on CUDA, "gpu" or "host" (pinned RAM, each token's row read
        over PCIe by `embed_rows` and kernels/step_io; --embed host), which a lm_head tied to the table refuses."""
        if attn not in ("sdpa", "flash", "triton"):
            raise ValueError(f"attn must be 'sdpa', 'flash' or 'triton' (resolve 'auto' with layers.pick_backend), "
                             f"got {attn!r}")
        if config.num_mla_layers:  # MLA reads its latent cache with its own torch path, on SDPA-style plans
            attn = "sdpa"
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_context = int(max_context)
        self.attn = attn
        self.provider = provider
        self._observer = observer
        self._prefetch_hook = prefetch_hook
        self._routing = routing
        # the router step, chosen once: the model's own router, or the override for static-position plans
        self._route = self._route_replayed if routing is not None else self._route_own
        dev = self.device
        if embed not in EMBED_PLACES:
            raise ValueError(f"embed must be one of {EMBED_PLACES}, got {embed!r}")
        if embed == "host" and config.tie_word_embeddings:
            raise ValueError(TIED_EMBED_HOST)
        host_table = embed == "host" and dev.type == "cuda"
        # [V, D] (never quantized: F.embedding reads rows); --embed host: in pinned RAM, read a row at a time
        self.embed = _take(dense, "embed", torch.device("cpu") if host_table else dev, dtype)
        if host_table:
            self.embed = self.embed.pin_memory()
        self.final_norm = norm_weight(config, _take(dense, "final_norm", dev, dtype), dev, dtype)  # [D]
        head = None if config.tie_word_embeddings else _take(dense, "lm_head", dev, dtype, keep=True)
        self.lm_head = self.embed if head is None else head  # [V, D]
        self.layers = [build_layer(config, dense, l, dev, dtype) for l in range(config.num_layers)]
        self.rope = Rope.build(config, self.max_context, device=dev, dtype=dtype)
        self.state = ModelState(config, self.max_context, device=dev, dtype=dtype, flash=attn == "flash",
                                paged=attn == "triton")
        self.cache: KVCache = self.state.kv  # rows of the attention layers only (state.row(l))
        self.linear_attn = pick_delta_backend(linear_attn, dev) if config.num_linear_layers else "none"
        self.delta_shape = DeltaShape(config.linear_num_key_heads, config.linear_num_value_heads,
                                      config.linear_key_head_dim, config.linear_value_head_dim,
                                      config.linear_conv_kernel, config.rms_norm_eps)
        self.groups = 1 if config.num_mla_layers else config.num_heads // config.num_kv_heads
        self.route_rule = route_rule(config)
        self.layer_rules = [None if lw.moe is None else layer_rule(config, lw.moe.score_bias) for lw in self.layers]
        self.mla_dims = mla_dims(config) if config.num_mla_layers else None
        self.mla_scale = mla_softmax_scale(self.mla_dims, config.rope_scaling) if self.mla_dims else 1.0
        # per-layer attention window: ModelConfig.extra["layer_types"] (gpt-oss) mixes sliding and full layers
        types = config.extra.get("layer_types")
        self.mixed_windows = bool(types) and config.sliding_window is not None
        self.layer_sliding = [t == "sliding_attention" for t in types] if self.mixed_windows else \
            [config.sliding_window is not None] * config.num_layers
        if attn in ("flash", "triton") and any(lw.attn is not None and lw.attn.sinks is not None for lw in self.layers):
            raise ValueError(SINKS_NEED_SDPA)
        self.fp32_route_weights = config.family in FP32_ROUTE_WEIGHTS
        if kernels and not moe_gpu.kernels_enabled(dev):
            raise ValueError(f"kernels=True needs a CUDA device and Triton; device is {dev}")
        self.kernels = moe_gpu.kernels_enabled(dev) if kernels is None else bool(kernels)
        # on the CPU, one token's experts through the native kernel (kernels/cpu_kernel.py; TIERED_CPU_KERNEL=torch
        # keeps torch); its dense GEMVs take it through qlinear either way
        self.cpu_native = dev.type == "cpu" and cpu_kernel.native_enabled()
        self.delta_step = (pick_delta_step(delta_step, self.linear_attn, self.kernels) if config.num_linear_layers
                           else "none")
        if glue and not glue_available(dev):
            raise ValueError(f"glue=True needs a CUDA device and Triton (or Triton's interpreter); device is {dev}")
        self.glue = (dev.type == "cuda" and glue_available(dev)) if glue is None else bool(glue)
        # one token's routing through the router kernel (kernels/fused_route.py: the residual add and norm before it,
        # the GEMV, and with TIERED_ROUTER=fused softmax-top-k in the same launch; gemv, the default, launches
        # softmax_topk after it; torch keeps F.linear); the fused launches' per-layer counters start at 0 and each
        # launch leaves its own at 0
        self._router_kernel = self._router_norm_kernel = None
        self._router_fuse = False
        self._router_count: Tensor | None = None
        self._router_layers: tuple[bool, ...] = (False,) * config.num_layers  # layers whose one token takes it
        if self.glue:
            from tiered.kernels import fused_route

            self.layer_rules = [fused_route.softmax_topk if r is softmax_topk else r for r in self.layer_rules]
            mode = fused_route.router_mode()
            if mode != "torch":
                self._router_kernel, self._router_norm_kernel = fused_route.router_topk, fused_route.norm_router_topk
                self._router_fuse = mode == "fused"
                self._router_count = torch.zeros(config.num_layers, dtype=torch.int32, device=dev)
                # softmax-top-k routers without bias, stored in the compute dtype
                self._router_layers = tuple(
                    lw.moe is not None and lw.moe.score_bias is None and lw.moe.router_bias is None
                    and rule is fused_route.softmax_topk and lw.moe.router.dtype == self.dtype
                    and lw.moe.router.is_contiguous() for lw, rule in zip(self.layers, self.layer_rules))
        # decode_static's inputs (embedding row, rotary rows, length) in one launch where its plan is the triton
        # backend's (kernels/step_io.py; TIERED_STEP_IO=torch keeps torch's ops)
        self._step_io = False
        if self.glue and attn == "triton" and not self.mixed_windows:
            from tiered.kernels import step_io

            self._step_io = step_io.enabled()

    @property
    def observer(self) -> RoutingObserver | None:
        return self._observer

    @property
    def prefetch_hook(self) -> PrefetchHook | None:
        return self._prefetch_hook

    @property
    def routing(self) -> RoutingOverride | None:
        return self._routing

    # --- eager path ---
    @torch.inference_mode()
    def forward(self, tokens: Tensor, start: int, *, all_logits: bool = False) -> Tensor:
        """tokens [T] int64 at positions start..start+T-1 (the cache holds 0..start-1).

        Returns logits [T, V] if all_logits else [1, V] (the last position), compute dtype.
        """
        T = tokens.shape[0]
        if start + T > self.max_context:
            raise ValueError(f"positions {start}..{start + T - 1} exceed max_context={self.max_context}: "
                             "raise --max-context or shorten the prompt")
        if start == 0:
            self.state.reset()
        return self._run(tokens, self._eager_plan(start, T), all_logits)

    def _eager_plan(self, start: int, T: int) -> StepPlan:
        """The plan of T tokens at positions start..start+T-1: one window for every layer, or with mixed windows
        (gpt-oss) the full layers' plan carrying the sliding layers' (`plan.sliding`; sinks: the SDPA path)."""
        if self.mixed_windows:
            plan = plan_eager(self.rope, start, T, groups=self.groups, window=None)
            slide = plan_eager(self.rope, start, T, groups=self.groups, window=self.config.sliding_window)
            return dataclasses.replace(plan, sliding=slide)
        return plan_eager(self.rope, start, T, groups=self.groups, window=self.config.sliding_window,
                          paged=self.attn == "triton")

    @contextmanager
    def preserve_state(self) -> Iterator[None]:
        """Run steps that must leave no trace in the sequence state (CUDA-graph warm-ups execute the step): the
        DeltaNet state is restored on exit; KV rows need nothing, the real step rewrites its position."""
        snap = self.state.snapshot()
        try:
            yield
        finally:
            self.state.restore(snap)

    def _run(self, tokens: Tensor, plan: StepPlan, all_logits: bool) -> Tensor:
        return self._layers_head(self.embed_rows(tokens), plan, all_logits)  # h [T, D]

    def _layers_head(self, h: Tensor, plan: StepPlan, all_logits: bool) -> Tensor:
        delta = None  # the previous layer's MoE output, added at the top of the next layer
        for l in range(len(self.layers)):
            r = self.attend_route(l, h, plan, delta)
            if self._observer is not None and self.layers[l].moe is not None:
                self._observer.on_route(l, r.h, r.ids, r.weights, r.logits.float())
            h, delta = r.h, self.experts_out(l, r)
        return self.head(h, all_logits, delta)

    def add_norm(self, h: Tensor, delta: Tensor | None, weight: Tensor) -> tuple[Tensor, Tensor]:
        """(h + delta, rms_norm(h + delta, weight)); delta None = no add. One launch with the glue kernels."""
        if self.glue:
            from tiered.kernels.fused_norm import add_rms_norm

            return add_rms_norm(h, delta, weight, self.config.rms_norm_eps)
        if delta is not None:
            h = h + delta
        return h, rms_norm(h, weight, self.config.rms_norm_eps)

    # --- the pieces of a layer (the eager loop above and the piecewise decode step share them) ---
    def attend_route(self, l: int, h: Tensor, plan: StepPlan, delta: Tensor | None = None, *,
                     defer_topk: bool = False, lookup: tuple | None = None) -> Routed:
        """Layer l up to its router: h [T, D] entering layer l (+ delta [T, D], the previous layer's MoE output,
        when given: the residual add fused with this layer's first norm) -> Routed (h after attention, norm,
        top-k). defer_topk: where one token goes through the unfused router kernel, leave its softmax-top-k to the
        caller's next kernel (Routed.topk_pending says whether it was left). lookup = (slot_of, base, slots [K],
        bad): where one token goes through the unfused router kernel without an override, its softmax-top-k launch
        also writes the chosen experts' slots in a complete device slot table (fused_route.softmax_topk's lookup;
        Routed.looked_up says whether it did)."""
        lw = self.layers[l]
        if plan.sliding is not None and self.layer_sliding[l]:
            plan = plan.sliding
        h, x = self.add_norm(h, delta, lw.attn_norm)
        mixed = self.mix(l, x, plan)
        if h.shape[0] == 1 and self._router_layers[l]:
            # one token: the residual add and the norm run inside the router's launch (fused_route.norm_router_topk)
            defer = defer_topk and not self._router_fuse
            look = lookup if not (defer or self._router_fuse or self._routing is not None) else None
            h, x, logits, ids, wts = self._router_norm_kernel(
                h, mixed, lw.mlp_norm, self.config.rms_norm_eps, lw.moe.router, self.config.top_k,
                self.config.norm_topk_prob, self._router_count[l:l + 1], fuse=self._router_fuse, defer=defer,
                lookup=look)
            if self._routing is not None:
                if defer and isinstance(plan.write_at, int):
                    raise ValueError("defer_topk with a host-position routing override: the override would replace "
                                     "ids the router has not written yet")
                logits, ids, wts = self._replayed(l, plan, logits, ids, wts)
            return Routed(h, x, logits, ids, wts, topk_pending=defer, looked_up=look is not None)
        h, x = self.add_norm(h, mixed, lw.mlp_norm)
        logits, ids, wts = self._route(l, x, plan)
        return Routed(h, x, logits, ids, wts)

    def mix(self, l: int, x: Tensor, plan: StepPlan) -> Tensor:
        """Layer l's token mixer over x [T, D] (normed): attention over its KV rows, or Gated DeltaNet over its
        conv and recurrent state (which take no positions: the order of calls is the order of tokens)."""
        lw, row = self.layers[l], self.state.row(l)
        if lw.mla is not None:  # one token: kv_b absorbed into q and the output (no per-head keys formed)
            return mla_attention(x, lw.mla, self.state.latent, row, plan, self.mla_dims, self.mla_scale,
                                 absorbed=x.shape[0] == 1)
        if lw.linear is not None:
            lin = self.state.linear
            return deltanet(x, lw.linear, self.delta_shape, lin.conv[row], lin.recurrent[row], backend=self.linear_attn,
                            step=self.delta_step)
        return attention(x, lw.attn, self.cache, row, plan, self.config, backend=self.attn, glue=self.glue)

    def _route_own(self, l: int, x: Tensor, plan: StepPlan) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.config
        moe = self.layers[l].moe
        if moe is None:  # a dense layer: no routing (empty ids; its MLP runs in experts_out)
            empty = torch.zeros(x.shape[0], 0, device=x.device)
            return empty.to(x.dtype), empty.long(), empty
        if moe.score_bias is not None:  # DeepSeek-V3 scores in fp32, as transformers' router does
            return route(x.float(), moe.router.float(), cfg.top_k, cfg.norm_topk_prob, rule=self.layer_rules[l])
        if x.shape[0] == 1 and self._router_layers[l]:
            return self._router_kernel(x, moe.router, cfg.top_k, cfg.norm_topk_prob, self._router_count[l:l + 1],
                                       fuse=self._router_fuse)
        return route(x, moe.router, cfg.top_k, cfg.norm_topk_prob, bias=moe.router_bias, rule=self.layer_rules[l])

    def _route_replayed(self, l: int, x: Tensor, plan: StepPlan) -> tuple[Tensor, Tensor, Tensor]:
        """The override's rows for host positions; static (device-position) plans route on the device and the
        piecewise step substitutes the override's rows between segments."""
        return self._replayed(l, plan, *self._route_own(l, x, plan))

    def _replayed(self, l: int, plan: StepPlan, logits: Tensor, ids: Tensor,
                  wts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The model's own routing replaced by the override's rows where the plan's positions are on the host."""
        if isinstance(plan.write_at, int) and self.layers[l].moe is not None:
            ids, wts = self._routing(l, plan.write_at, ids.shape[0])
            logits = routed_logits(ids, wts, logits.shape[-1])
        return logits, ids, wts

    def experts_out(self, l: int, r: Routed, slots: Tensor | None = None, partial: Any = None,
                    wait: Any = None) -> Tensor:
        """Layer l's MoE output [T, D] (routed + shared experts); `slots` [K] = known slot rows (T = 1),
        else the provider resolves them (and the prefetch hook runs, for one token). `partial` [1, D]: the
        CPU-computed experts' sum, added after the device's (model/cpu_experts.py), or a callable that adds it in
        place (moe.expert_mix). wait: the slots still copying (moe.expert_mix). A dense layer runs its MLP."""
        lw = self.layers[l]
        if lw.dense_mlp is not None:
            g, u, d = lw.dense_mlp
            return linear(F.silu(linear(r.x, g)) * linear(r.x, u), d)
        return expert_mix(r.x, r.ids, r.weights, self.layers[l].moe, self.provider, l, slots=slots,
                          fp32_weights=self.fp32_route_weights, prefetch_hook=self._prefetch_hook,
                          kernels=self.kernels, native=self.cpu_native, partial=partial, wait=wait)

    def head(self, h: Tensor, all_logits: bool = False, delta: Tensor | None = None) -> Tensor:
        """Final norm and lm_head: h [T, D] (+ delta [T, D], the last layer's MoE output) -> logits [T, V]
        (all_logits) or [1, V] (the last position)."""
        if not all_logits:
            h = h[-1:]
            delta = None if delta is None else delta[-1:]
        return linear(self.add_norm(h, delta, self.final_norm)[1], self.lm_head)

    # --- the one-token step in L+1 segments (tiered/decode/piecewise.py runs them, with host routing between) ---
    def segment_first(self, tokens: Tensor, plan: StepPlan, *, defer_topk: bool = False,
                      lookup: tuple | None = None) -> Routed:
        """Segment 0: embedding, layer 0's attention, norm and router (defer_topk, lookup: attend_route's)."""
        return self.attend_route(0, self.embed_rows(tokens), plan, defer_topk=defer_topk, lookup=lookup)

    def segment_mid(self, l: int, prev: Routed, slots: Tensor, plan: StepPlan, partial: Any = None, *,
                    defer_topk: bool = False, lookup: tuple | None = None, wait: Any = None) -> Routed:
        """Segment l (1..L-1): layer l-1's experts from `slots` [K] (+ `partial`, its CPU experts' sum; `wait`:
        those still copying, moe.expert_mix) + residual, then layer l up to its router (defer_topk, lookup:
        attend_route's)."""
        if prev.topk_pending:
            raise ValueError(f"segment_mid({l}): layer {l - 1}'s top-k was deferred and nothing computed it")
        return self.attend_route(l, prev.h, plan, self.experts_out(l - 1, prev, slots, partial, wait),
                                 defer_topk=defer_topk, lookup=lookup)

    def segment_last(self, prev: Routed, slots: Tensor, partial: Any = None, wait: Any = None) -> Tensor:
        """Segment L: layer L-1's experts from `slots` [K] (+ `partial`, `wait`) + residual, final norm, lm_head ->
        logits [1, V]."""
        if prev.topk_pending:
            raise ValueError("segment_last: the last layer's top-k was deferred and nothing computed it")
        return self.head(prev.h, False, self.experts_out(len(self.layers) - 1, prev, slots, partial, wait))

    # --- graph-capturable one-token step ---
    @property
    def one_graph(self) -> bool:
        """True when the attention reads the cache length from the device (triton, flash): a captured step
        serves every position of its bucket (flash one bucket, triton two: `graph_span`); SDPA reads a fixed span
        per graph."""
        return self.attn in ("triton", "flash")

    def graph_span(self, pos: int) -> int:
        """The span bucket of a one-token step at `pos` (the key of its captured graph): SDPA's power of two;
        triton's kernel capacity (layers.kernel_capacity: a short grid while the cache fits SHORT_CAPACITY, then
        max_context); flash's max_context."""
        if self.attn == "triton":
            return kernel_capacity(pos + 1, self.max_context)
        return self.max_context if self.one_graph else span_for(pos, self.max_context)

    def graph_spans(self) -> list[int]:
        """Every span bucket a one-token step may use, i.e. the graphs to capture before decoding."""
        if self.attn == "triton":
            return sorted({kernel_capacity(1, self.max_context), self.max_context})
        if self.one_graph:
            return [self.max_context]
        return sorted({span_for(p, self.max_context) for p in _bucket_starts(self.max_context)})

    def static_plan(self, pos: Tensor, span: int) -> StepPlan:
        """The plan of a one-token step at device position pos [1] int64 reading cache positions [0, span):
        no host sync, every shape depends only on `span` (triton and flash read the length from `pos` and
        ignore the span)."""
        cos = self.rope.cos.index_select(0, pos)  # [1, hd]
        sin = self.rope.sin.index_select(0, pos)
        if self.mixed_windows:  # sinks models run on the SDPA path (checked at construction)
            full = attn_mask(pos, 0, span, window=None, groups=self.groups)
            slide = attn_mask(pos, 0, span, window=self.config.sliding_window, groups=self.groups)
            return StepPlan(cos, sin, pos, 0, span, full, sliding=StepPlan(cos, sin, pos, 0, span, slide))
        if self.one_graph:
            lengths = (pos + 1).to(torch.int32) if self.attn == "triton" else None
            seqlens = pos.to(torch.int32) if self.attn == "flash" else None
            return StepPlan(cos, sin, pos, 0, span, None, seqlens, lengths)
        mask = attn_mask(pos, 0, span, window=self.config.sliding_window, groups=self.groups)  # [G, span]
        return StepPlan(cos, sin, pos, 0, span, mask)

    def embed_rows(self, tokens: Tensor) -> Tensor:
        """tokens [T] int64 on the model's device -> their embedding rows [T, D] there: F.embedding, or for a table
        in pinned RAM (--embed host) one launch reading the rows over PCIe (kernels/step_io.embed_rows)."""
        if self.embed.device.type == self.device.type:
            return F.embedding(tokens, self.embed)
        from tiered.kernels.step_io import embed_rows

        return embed_rows(tokens.reshape(-1), self.embed).view(*tokens.shape, -1)

    def decode_static(self, token: Tensor, pos: Tensor, span: int) -> Tensor:
        """token [1] int64, pos [1] int64 (both on device) -> logits [1, V]; reads cache positions [0, span).

        Every shape depends only on `span`, so one CUDA graph per span serves every position < span (with
        flash one graph, span = max_context, serves every position; triton's spans are kernel capacities).
        """
        if self._step_io:  # the embedding row, rotary rows and length in one launch (kernels/step_io.py)
            from tiered.kernels.step_io import step_inputs

            h, cos, sin, lengths = step_inputs(token.view(1), pos.view(1), self.embed, self.rope.cos, self.rope.sin)
            return self._layers_head(h, StepPlan(cos, sin, pos, 0, span, None, None, lengths), False)
        return self._run(token, self.static_plan(pos, span), False)


    # --- graph-capturable first prompt chunk ---
    @property
    def prefill_graphable(self) -> bool:
        """Whether `prefill_static` may run in a CUDA graph with padding: every layer's state is addressed by
        position (attention only: a DeltaNet state or MLA's own path would take the padding in; sliding layers
        keep every position too, so gpt-oss's mixed windows qualify), no observer and no routing override (a
        replay skips them)."""
        c = self.config
        return (not c.num_linear_layers and not c.num_mla_layers and self._observer is None
                and self._routing is None)

    def prefill_static(self, tokens: Tensor, last: Tensor) -> Tensor:
        """tokens [T] int64 at positions 0..T-1 (a fresh sequence), last [1] int64 on the device -> the logits
        [1, V] of position `last`. Every shape depends on T only, so one CUDA graph per T serves every prompt
        of at most T tokens, padded after its last token: causal attention keeps the padding out of the
        positions before it, and the K/V it stores past the prompt are rewritten by the decode steps before
        any of them reads there (decode/graphedprefill.py)."""
        plan = self._eager_plan(0, tokens.shape[0])
        h = self.embed_rows(tokens)  # [T, D]
        delta = None
        for l in range(len(self.layers)):
            r = self.attend_route(l, h, plan, delta)
            h, delta = r.h, self.experts_out(l, r)
        h, delta = h.index_select(0, last), None if delta is None else delta.index_select(0, last)
        return linear(self.add_norm(h, delta, self.final_norm)[1], self.lm_head)


def span_for(pos: int, max_context: int) -> int:
    """The attended span of a one-token SDPA step at `pos`: a power of two >= 128, capped at max_context."""
    return min(max_context, max(128, 1 << math.ceil(math.log2(pos + 1))))


def _bucket_starts(max_context: int) -> list[int]:
    """One position in each span bucket below max_context: 0, 128, 256, 512, ... (then capped)."""
    starts, p = [0], 128
    while p < max_context:
        starts.append(p)
        p *= 2
    return starts
