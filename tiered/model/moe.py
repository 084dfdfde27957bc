"""The sparse MoE block: router, routed SwiGLU experts over an ExpertProvider, the shared expert.

Owns: `route` (softmax in fp32, then top-k, optional renormalisation, as transformers), `routed_experts`
(two paths: one token gathers its K experts and runs batched matmuls; several tokens are grouped by
expert, and the distinct experts are streamed through the provider in waves of at most
`provider.max_experts_per_call`), `shared_expert` (Qwen2-MoE, sigmoid-gated), `moe_block`, which
calls the routing observer (SEAMS.md) before any expert is computed, and `expert_mix` (everything
after routing; with known slot rows it is the expert segment of the piecewise decode step).
Does not own: where expert weights live (the provider: resident.py, or the cache), nor dense weights, nor
the CUDA kernels (model/moe_gpu.py over tiered/kernels; `expert_mix(kernels=True)` routes to them).

Expert weights arrive in their stored dtype and are converted on use when the compute dtype differs; quantized
ones (QuantWeight) are read by the fused dequantizing kernels on CUDA (kernels/quant_moe.py) and otherwise
dequantized per expert on use (the plain reference path: never the whole pool at once).

Legend: T tokens, D hidden, E experts per layer, K top-k, F expert FFN, U distinct experts in a wave.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.kernels import cpu_kernel
from tiered.kernels.quant_moe import experts_quant_decode, qlinear as linear
from tiered.layout.quant import QuantWeight, dense
from tiered.model import moe_gpu
from tiered.model.routing import Rule, softmax_topk
from tiered.store.provider import ExpertProvider


class RoutingObserver(Protocol):
    """Sees each layer's routing before that layer's experts run (SEAMS.md).

    needs_hidden / needs_logits: whether on_route reads `hidden` / `router_logits`. When False, the piecewise
    decode step skips those device->host copies and passes an empty [T, 0] hidden / None logits; the eager
    path always passes everything.
    deferrable: nothing the observer does must precede this layer's `get()`, and it needs no hidden state.
    The piecewise step may then call it after the next segment is enqueued (host copies of ids, weights and
    logits), and calls the prefetch hook after it instead of right after `get()`.
    `Observer` below is a base class with the conservative answers (everything needed, not deferrable).
    """
    deferrable: bool
    needs_hidden: bool
    needs_logits: bool

    def on_route(self, layer: int, hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                 router_logits: Tensor | None) -> None: ...


class Observer:
    """A RoutingObserver base with the conservative declarations; subclasses override what they relax."""
    deferrable = False
    needs_hidden = True
    needs_logits = True

    def on_route(self, layer: int, hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                 router_logits: Tensor | None) -> None:
        raise NotImplementedError


class PrefetchHook(Protocol):
    """Called in one-token decode steps once layer `layer`'s routing is on the host and its experts are
    resolved (provider.get returned), before layer `layer`'s expert compute is enqueued: the place to call
    provider.prefetch(layer + d, ...) so that next-layer loads overlap this layer's compute (SEAMS.md)."""

    def __call__(self, layer: int, expert_ids: Tensor) -> None: ...  # expert_ids int64 [K] on the host


@dataclass(frozen=True)
class MoEWeights:
    router: Tensor  # [E, D]
    shared_gate: Tensor | None = None  # [Fs, D]
    shared_up: Tensor | None = None  # [Fs, D]
    shared_down: Tensor | None = None  # [D, Fs]
    shared_expert_gate: Tensor | None = None  # [1, D]
    router_bias: Tensor | None = None  # [E] (gpt-oss)
    score_bias: Tensor | None = None  # [E] fp32 (DeepSeek-V3's e_score_correction_bias: the choice only)
    act: "ClampedSwiGLU | None" = None  # None: SiLU(gate) * up; else gpt-oss's clamped form
    shared_in: Tensor | None = None  # [2*Fs (+1), D]: shared gate, up (and expert gate) stacked; those fields are its
    #                                  row views. None when any of them is quantized (--dense)

    @staticmethod
    def stacked(**kw) -> "MoEWeights":
        """The weights with the shared expert's input projections stacked into one matrix (`shared_in`) when it has
        plain (unquantized) ones, so the fused path projects in one GEMV."""
        parts = [kw.get("shared_gate"), kw.get("shared_up")]
        if kw.get("shared_expert_gate") is not None:
            parts.append(kw["shared_expert_gate"])
        if parts[0] is None or not all(type(p) is Tensor for p in parts):
            return MoEWeights(**kw)
        stack = torch.cat(parts, dim=0)
        views = stack.split([p.shape[0] for p in parts], dim=0)
        kw.update(shared_gate=views[0], shared_up=views[1], shared_in=stack)
        if len(views) == 3:
            kw["shared_expert_gate"] = views[2]
        return MoEWeights(**kw)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation: gate clamped above at `limit`, up to [-limit, limit],
    out = (up + 1) * gate * sigmoid(alpha * gate)."""
    alpha: float = 1.702
    limit: float = 7.0

    def __call__(self, g: Tensor, u: Tensor) -> Tensor:
        g = g.clamp(max=self.limit)
        u = u.clamp(-self.limit, self.limit)
        return (u + 1) * (g * torch.sigmoid(g * self.alpha))


def _act(act: ClampedSwiGLU | None, g: Tensor, u: Tensor) -> Tensor:
    return F.silu(g) * u if act is None else act(g, u)


def routed_logits(ids: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """Router logits consistent with a routing chosen elsewhere (replayed routing, benchmark mode):
    ids [T, K], weights [T, K] -> fp32 [T, E] whose softmax is the routed weights (renormalised) on the
    routed experts and ~0 elsewhere. Observers (predictors, --policy predicted) see these instead of the
    model's own logits, which would disagree with the replayed choice."""
    out = torch.full((ids.shape[0], num_experts), -1e4, dtype=torch.float32, device=ids.device)
    return out.scatter_(1, ids, torch.log(weights.float().clamp_min(1e-9)))


def route(x: Tensor, router: Tensor, top_k: int, norm_topk: bool, *, bias: Tensor | None = None,
          rule: Rule = softmax_topk) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, D] (normed) -> router logits [T, E] (compute dtype), ids [T, K] int64, weights [T, K] fp32;
    `rule` is one of routing.RULES."""
    logits = F.linear(x, router, bias)
    ids, w = rule(logits, top_k, norm_topk)
    return logits, ids, w


def _swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def shared_expert(x: Tensor, w: MoEWeights) -> Tensor:
    """Qwen2-MoE's always-on expert, scaled by sigmoid(x @ shared_expert_gate) when there is one."""
    y = _swiglu(x, w.shared_gate, w.shared_up, w.shared_down)
    if w.shared_expert_gate is not None:
        y = torch.sigmoid(F.linear(x, w.shared_expert_gate)) * y
    return y


def add_shared_expert(out: Tensor, x: Tensor, w: MoEWeights, *, fused: bool) -> Tensor:
    """out [T, D] + the shared expert of x [T, D]. fused (CUDA with Triton kernels, stacked plain weights): one GEMV
    over `shared_in`, then kernels/shared_expert.py's SwiGLU, the down GEMV and the gated add; else `shared_expert`."""
    if not fused or w.shared_in is None:
        return out + shared_expert(x, w)
    from tiered.kernels.shared_expert import gated_add, swiglu_rows

    Fs = w.shared_gate.shape[0]
    y = F.linear(x, w.shared_in)  # [T, 2Fs (+1)]
    d = linear(swiglu_rows(y, Fs), w.shared_down)
    return gated_add(out, d, y[:, 2 * Fs] if w.shared_expert_gate is not None else None)


def experts_one_token(x: Tensor, ids: Tensor, weights: Tensor, provider: ExpertProvider, layer: int,
                      act: ClampedSwiGLU | None = None) -> Tensor:
    """Decode path, T = 1: the provider's slots for the K experts, then `experts_from_slots` (no host sync
    beyond what the provider's get() needs). x [1, D], ids [1, K] (distinct), weights [1, K] -> [1, D]."""
    return experts_from_slots(x, provider.get(layer, ids[0]), weights, provider.weights, act)


def experts_from_slots(x: Tensor, slots: Tensor, weights: Tensor, W: Any, act: ClampedSwiGLU | None = None, *,
                       slot_base: int = 0, round_to: torch.dtype | None = None, fused: bool = True,
                       native: bool = False) -> Tensor:
    """One token's K experts, given their slot rows in W: gather the weights, then GEMMs with no host sync.

    x [1, D], slots [K] int64 on W's device (the rows are slot_base + slots), weights [1, K] (compute dtype, or
    fp32; rounded to `round_to` first when given, inside the fused kernels), W = provider.weights -> [1, D].
    The K experts' gate (and up) rows are stacked into one [K*F, D] matrix, so each projection is a single GEMV;
    the down projection is one batched [1, F] x [F, D] product per expert over the transposed view (no copy).
    Measured on CPU, about 3x faster than batched matmuls with one column. Rounding follows
    transformers' grouped_mm experts: each expert's output in the compute dtype, times its weight, summed
    over K with one rounding. Every shape depends only on K, so a CUDA graph can capture it with `slots` a
    static buffer (the piecewise decode step).
    fused=False skips the fused kernels (expert_mix's kernels=False: the reference path on every device).
    native (host tensors): the native CPU kernel (kernels/cpu_kernel.py `partial`, the K experts read in place from
    W, fp32 sums) where it supports W, the activation and the dtype: fp32 compute (the same math up to the
    summation order), or quantized experts in any compute dtype. Float experts in a bf16/fp16 compute dtype keep
    the torch path, whose roundings are transformers' (the kernel rounds the SwiGLU once, torch after each op).
    """
    dt = x.dtype
    if native and x.device.type == "cpu" and (dt == torch.float32 or isinstance(W.gate, QuantWeight)):
        kern = cpu_kernel.shared()
        if kern is not None and kern.supports(W, act, dt):
            jobs = [(k, W, slot_base + s) for k, s in enumerate(slots.tolist())]
            y = kern.partial(x, weights[0], jobs, threads=torch.get_num_threads(), fp32_weights=round_to is None,
                             act=act)
            if y is not None:
                return y
    # fused dequantization on CUDA (SwiGLU, or gpt-oss's clamped form with its biases); None -> the reference below
    if fused and isinstance(W.gate, QuantWeight):
        b = getattr(W, "gate_bias", None)
        y = experts_quant_decode(x, slots, weights, W.gate, W.up, W.down, slot_base=slot_base, round_to=round_to,
                                 act=act, biases=None if b is None else (b, W.up_bias, W.down_bias))
        if y is not None:
            return y
    if slot_base:
        slots = slots + slot_base
    if round_to is not None:
        weights = weights.to(round_to)
    g = dense(W.gate.index_select(0, slots), dt)  # [K, F, D] (quantized: dequantized, the K experts only)
    u = dense(W.up.index_select(0, slots), dt)  # [K, F, D]
    d = dense(W.down.index_select(0, slots), dt)  # [K, D, F]
    K, Fe, D = g.shape
    gb, ub, db = _biases(W, slots, dt)
    gx = F.linear(x, g.view(K * Fe, D), None if gb is None else gb.view(K * Fe))
    ux = F.linear(x, u.view(K * Fe, D), None if ub is None else ub.view(K * Fe))
    h = _act(act, gx, ux)  # [1, K*F]
    y = torch.bmm(h.view(K, 1, Fe), d.transpose(1, 2))  # [K, 1, D]
    if db is not None:
        y = y + db[:, None, :]
    return (y * weights.view(K, 1, 1)).sum(0).to(dt)  # [1, D]


def _biases(W: Any, slots: Tensor, dt: torch.dtype) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gate/up [K, F] and down [K, D] biases of the experts in `slots` (None for families without)."""
    if getattr(W, "gate_bias", None) is None:
        return None, None, None
    return tuple(getattr(W, n).index_select(0, slots).to(dt) for n in ("gate_bias", "up_bias", "down_bias"))


def _expert(x: Tensor, W: Any, s: int, dt: torch.dtype, act: ClampedSwiGLU | None) -> Tensor:
    """One expert (slot row s) over x [n, D] -> [n, D], biases included when the family has them."""
    g, u, d = dense(W.gate[s], dt), dense(W.up[s], dt), dense(W.down[s], dt)  # quantized: dequantized here
    if getattr(W, "gate_bias", None) is None:
        if act is None:
            return _swiglu(x, g, u, d)
        return F.linear(act(F.linear(x, g), F.linear(x, u)), d)
    h = _act(act, F.linear(x, g, W.gate_bias[s].to(dt)), F.linear(x, u, W.up_bias[s].to(dt)))
    return F.linear(h, d, W.down_bias[s].to(dt))


def native_rows_ok(x: Tensor, W: Any) -> bool:
    """Whether `native_rows` may serve experts of pool W for host rows like x: the decode path's rule (fp32
    compute, or quantized experts in any compute dtype; no biases) and the native kernel loaded."""
    return x.device.type == "cpu" and getattr(W, "gate_bias", None) is None \
        and (x.dtype == torch.float32 or isinstance(W.gate, QuantWeight)) and cpu_kernel.shared() is not None


def native_rows(xs: Tensor, W: Any, slots: list[int], counts: list[int]) -> Tensor | None:
    """Experts (pool W, rows `slots`) over their own rows of xs [sum(counts), D] (host, grouped by expert in slots'
    order) -> [sum(counts), D] unweighted, through the native CPU kernel (cpu_kernel.expert_rows: read in place,
    fp32 sums); None where it does not serve them (check native_rows_ok first)."""
    kern = cpu_kernel.shared()
    if kern is None or not slots:
        return None
    return kern.expert_rows(xs, W, slots, counts, threads=torch.get_num_threads())


def experts_grouped(x: Tensor, ids: Tensor, weights: Tensor, provider: ExpertProvider, layer: int,
                    act: ClampedSwiGLU | None = None, *, native: bool = False) -> Tensor:
    """Prefill path: tokens grouped by expert, experts streamed through the provider in waves.

    x [T, D], ids [T, K], weights [T, K] (compute dtype, or fp32) -> [T, D]. Each (token, k) output
    lands in its own row and the K rows of a token are summed at the end, as transformers' grouped_mm
    experts do, so the result does not depend on the wave size.
    native (host tensors, the plain SwiGLU without biases): a wave's experts over their rows in one call of the
    native CPU kernel (`native_rows`), under the decode path's rule: fp32 compute (the same math up to the
    summation order), or quantized experts in any compute dtype (read as q*s + m in fp32, not rounded to the
    compute dtype first; the SwiGLU rounded once); float experts in bf16/fp16 keep the torch path, whose roundings
    are transformers'. Else `_expert`, which dequantizes each expert whole.
    """
    T, K = ids.shape
    flat = ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K] (token, k) entries sorted by expert
    tok = order // K  # [T*K] token of each sorted entry
    wsorted = weights.reshape(-1)[order]  # [T*K]
    used, counts = torch.unique_consecutive(flat[order], return_counts=True)
    used_l, counts_l = used.tolist(), counts.tolist()
    starts = [0]
    for c in counts_l:
        starts.append(starts[-1] + c)
    rows = torch.empty((T * K, x.shape[1]), dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
    n = max(1, int(provider.max_experts_per_call))
    W = provider.weights
    dt = x.dtype
    use_native = native and act is None and native_rows_ok(x, W)
    for w0 in range(0, len(used_l), n):
        slots = provider.get(layer, used[w0:w0 + n]).tolist()  # the wave's slots, pinned until the next get()
        if w0 + n < len(used_l):
            provider.prefetch(layer, used[w0 + n:w0 + 2 * n])
        A, B = starts[w0], starts[w0 + len(slots)]
        y = native_rows(x[tok[A:B]], W, slots, counts_l[w0:w0 + len(slots)]) if use_native else None
        if y is not None:  # the wave's experts in one native call
            rows.index_copy_(0, order[A:B], y * wsorted[A:B, None])
            continue
        for j, s in enumerate(slots):
            a, b = starts[w0 + j], starts[w0 + j + 1]
            y = _expert(x[tok[a:b]], W, s, dt, act)  # [n_e, D]
            rows.index_copy_(0, order[a:b], y * wsorted[a:b, None])
    return rows.view(T, K, -1).sum(1).to(dt)  # [T, D]


# transformers' Mixtral router keeps the routing weights in fp32 (the others cast them to the compute dtype).
FP32_ROUTE_WEIGHTS = frozenset({"mixtral"})


def moe_block(h: Tensor, x: Tensor, w: MoEWeights, provider: ExpertProvider, layer: int, *, top_k: int,
              norm_topk: bool, observer: RoutingObserver | None = None, fp32_weights: bool = False,
              prefetch_hook: PrefetchHook | None = None) -> Tensor:
    """h [T, D] residual after attention, x [T, D] = post-attention norm of h -> MoE output [T, D]."""
    logits, ids, wts = route(x, w.router, top_k, norm_topk, bias=w.router_bias)
    if observer is not None:
        observer.on_route(layer, h, ids, wts, logits.float())
    return expert_mix(x, ids, wts, w, provider, layer, fp32_weights=fp32_weights, prefetch_hook=prefetch_hook)


def expert_mix(x: Tensor, ids: Tensor, wts: Tensor, w: MoEWeights, provider: ExpertProvider, layer: int, *,
               slots: Tensor | None = None, fp32_weights: bool = False,
               prefetch_hook: PrefetchHook | None = None, kernels: bool = False, native: bool = False,
               partial: Tensor | Callable[[Tensor], Tensor] | None = None, wait: Any = None) -> Tensor:
    """The MoE output once routing is known: routed experts (+ the shared expert) -> [T, D].

    x [T, D] normed, ids [T, K] int64, wts [T, K] fp32 routing weights. With `slots` ([K] int64, T = 1)
    the experts' slot rows are already known (the piecewise decode step asked the provider between
    segments) and the provider is not called; otherwise the provider's get() resolves them, and for one
    token `prefetch_hook(layer, ids)` (ids int64 [K] on the host) runs right after it.
    kernels=True (CUDA) runs the Triton kernels of model/moe_gpu.py over the same slots; False keeps the
    torch paths below (the CPU path and the kernels' reference). native=True (host tensors): one token's experts
    through the native CPU kernel where it supports them (experts_from_slots). Quantized experts: one token takes
    experts_from_slots, which reads them with the fused dequantizing kernels on CUDA (kernels/quant_moe.py);
    several tokens with kernels=True take moe_gpu.experts_tokens (fused GEMV or grouped dequantizing kernels,
    kernels/quant_grouped.py), else experts_grouped, which dequantizes one expert at a time.
    CPU experts (--cpu-experts, a provider with `host_split`): for one token without known slots, the provider's
    get_split sends some experts to the CPU (their slot is a zero expert); they run on its worker thread while
    the device computes the others, and their weighted sum is added after the device's routed experts.
    `partial` [1, D] (piecewise step): that sum, already computed, to add the same way; or a callable that adds it
    to the device experts' output in place (the device step: it waits there for the CPU worker's answer, so the
    device's experts run while the CPU computes, kernels/cpu_handoff.py).
    wait (with `slots`, float experts and kernels=True): some of those slots are still being copied by the gather
    launched right before (kernels/moe_decode.Landing, the device step's overlapped gather); their experts wait for
    their rows inside the kernel, the resident ones run meanwhile. Elsewhere: an error (nothing else could honour it).
    """
    # transformers casts the routing weights to the compute dtype (Mixtral keeps fp32): one token's paths pass
    # them as they are with `round_to`, and the fused kernels round them (no cast kernel per layer)
    round_to = None if fp32_weights else x.dtype
    # One token: the decode kernels (moe_decode for float pools; quantized pools through experts_from_slots, whose
    # fused GEMV kernels do the same). Several tokens: moe_gpu.experts_tokens (the one-token kernels over T*K pairs
    # up to decode_max_t tokens, then the grouped kernels) when those serve the pool. Every kernel takes both
    # activations and gpt-oss's expert biases.
    fused_shared = kernels and w.act is None
    quant = isinstance(provider.weights.gate, QuantWeight)
    float_kernels = kernels and not quant

    if wait is not None and (slots is None or not float_kernels):
        raise ValueError(f"layer {layer}: expert_mix(wait=...) needs known slots and the float decode kernels "
                         f"(kernels={kernels}, quantized experts={quant})")

    def one(s: Tensor, base: int = 0) -> Tensor:  # one token's K experts at rows base + s
        if float_kernels:
            return moe_gpu.experts_decode(x, s, wts, provider.weights, slot_base=base, round_to=round_to, act=w.act,
                                          wait=wait)
        return experts_from_slots(x, s, wts, provider.weights, w.act, slot_base=base, round_to=round_to,
                                  fused=kernels, native=native)

    if slots is not None:
        out = one(slots)
    elif x.shape[0] == 1 and getattr(provider, "host_split", False):
        from tiered.model import cpu_experts  # imports this module

        s, jobs = provider.get_split(layer, ids[0])
        fut = cpu_experts.start(provider, x.cpu(), wts[0].cpu(), jobs, w.act, fp32_weights) if jobs else None
        out = one(s)
        if fut is not None:
            partial = cpu_experts.finish(provider, fut, len(jobs)).to(x.device)
        if prefetch_hook is not None:  # after the CPU jobs: its prefetches may reuse the RAM blocks they read
            prefetch_hook(layer, ids[0].cpu())
    elif x.shape[0] == 1:
        # a provider whose slots are ids + a base (every expert resident) lets the kernels add it: no add kernel
        base = provider.slot_base(layer, ids) if hasattr(provider, "slot_base") else None
        s = ids[0] if base is not None else provider.get(layer, ids[0])
        if prefetch_hook is not None:
            prefetch_hook(layer, ids[0].cpu())
        out = one(s, base or 0)
    else:
        wc = wts if round_to is None else wts.to(round_to)
        if kernels and (not quant or moe_gpu.quant_kernels_ok(provider.weights)):  # checked for T > 1 only
            out = moe_gpu.experts_tokens(x, ids, wc, provider, layer, w.router.shape[0], act=w.act)
        else:
            out = experts_grouped(x, ids, wc, provider, layer, w.act, native=native)
    if partial is not None:
        out = partial(out) if callable(partial) else out + partial
    if w.shared_gate is not None:
        out = add_shared_expert(out, x, w, fused=fused_shared)
    return out
