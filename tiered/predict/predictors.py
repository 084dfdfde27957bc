"""Next-layer expert predictors: which experts layer l+d will route to, known before layer l's experts run.

Owns: the `Predictor` interface (`reset`, `observe(layer, hidden, routed_ids, router_logits)`,
`rank(layer) -> scores [E]`), the predictors (no prediction, previous-token reuse, next-gate, router
history, activation matching, the fitted log-linear combination), `PredictorParams` (everything fitted
on a trace of fitting text (never the text reported on), saved as one safetensors file next to the layout), `fit_params`, and the
batched `score_trace` that replays a whole trace at once for offline metrics.
Does not own: traces (trace.py), cache policies or prefetch I/O (store/, prefetch.py), metrics (simulate.py).

Lead-time rule (docs/metrics.md): scores for layer l+1 of token t use only layer l's router output, the
hidden state after layer l's attention, earlier layers of token t and earlier tokens. `score_trace` is
the batched form of the same computation: out[n, l] scores layer l of token n from that information
(layer l-1 of token n and tokens < n); out[n, 0] uses token n-1 only. tests/test_predict.py checks the
rule by perturbing everything after a point of a trace, and checks `score_trace` against observe/rank.

Online semantics: observe() is called once per layer with the tokens of one forward (T = 1 in
decode); rank(l) returns scores for the last observed token. Previous-token state advances per layer,
so the one-token path matches `score_trace` exactly.

Layers here are routed (MoE) layers, as in traces: layer l is the model's ModelConfig.moe_layers[l], and
"layer l+1" is the next MoE layer (a dense layer, DeepSeek-V3's first_k_dense_replace, has no experts to
predict). The Prefetcher (prefetch.py) maps model layers to these indices and back.

Legend: N tokens, T tokens of one forward, L routed layers, E experts per layer, K top-k, D hidden, M stored paths.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.predict.trace import Trace

PARAMS_FILE = "predictor.safetensors"
EAM_PATHS = 4096  # stored routing paths for activation matching (MoE-Infinity's matrices, per token)
EAM_NEIGHBOURS = 16


# --------------------------------------------------------------------------- dense pieces
@dataclass(frozen=True)
class GateWeights:
    """Each MoE layer's post-attention norm and router, fp32 on CPU: what next-gate applies early. Layer l
    here is the model's l-th MoE layer (ModelConfig.moe_layers), as in traces; dense layers have no router."""

    mlp_norm: Tensor  # [L, D]
    router: Tensor  # [L, E, D]
    eps: float

    @classmethod
    def from_layout(cls, layout: Any) -> "GateWeights":
        cfg = layout.config
        dense = layout.dense()
        layers = cfg.moe_layers
        return cls(torch.stack([dense[f"layers.{l}.mlp_norm"].float() for l in layers]),
                   torch.stack([dense[f"layers.{l}.router"].float() for l in layers]), float(cfg.rms_norm_eps))

    def logits(self, h: Tensor, layer: int) -> Tensor:
        """h [T, D] (any dtype) -> router `layer` applied after its own norm: [T, E] fp32."""
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.mlp_norm[layer]
        return x @ self.router[layer].T


def _multi_hot(ids: Tensor, E: int) -> Tensor:
    """ids [T, K] -> float [T, E] with 1 at routed experts."""
    return torch.zeros(ids.shape[0], E).scatter_(1, ids.long(), 1.0)


def _probs(logits: Tensor | None, ids: Tensor, weights: Tensor | None, E: int) -> Tensor:
    """Router probabilities [T, E] from logits, or the routed weights scattered when logits are absent."""
    if logits is not None:
        return torch.softmax(logits.float(), -1)
    w = torch.ones(ids.shape, dtype=torch.float32) if weights is None else weights.float()
    return torch.zeros(ids.shape[0], E).scatter_(1, ids.long(), w)


def _prev(x: Tensor, starts: Tensor) -> Tensor:
    """x [N, ...] -> the previous token's row (zeros at document starts)."""
    out = torch.zeros_like(x)
    out[1:] = x[:-1]
    out[starts] = 0
    return out


# --------------------------------------------------------------------------- fitted parameters
@dataclass(frozen=True)
class PredictorParams:
    """Everything fitted on fit/ text. Saved as one safetensors file (PARAMS_FILE) with JSON metadata."""

    layer_trans: Tensor  # [L-1, E, E] P(e' at l+1 | e at l), rows sum to 1
    time_trans: Tensor  # [L, E, E] P(e at t+1 | e' at t), same layer
    prior: Tensor  # [L, E] expert frequency per layer
    paths: Tensor  # [M, L, E] float 0/1: stored routing paths (activation matrices per token)
    mix_w: Tensor  # [L-1, E, 5E] log-linear combination for layer l+1 (features: see _mix_features)
    mix_b: Tensor  # [L-1, E]
    meta: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        t = {k: getattr(self, k).contiguous() for k in ("layer_trans", "time_trans", "prior", "paths", "mix_w", "mix_b")}
        save_file(t, str(path), metadata={"meta": json.dumps(self.meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PredictorParams":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata().get("meta", "{}"))
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(meta=meta, **t)


def _mix_features(ng: Tensor, logits_l: Tensor | None, ids_l: Tensor, w_l: Tensor | None, prev_probs: Tensor,
                  prev_hot: Tensor, E: int) -> Tensor:
    """Features of the log-linear mix for layer l+1 -> [T, 5E]:
    next-gate logits, layer l's router log-probs, layer l's multi-hot, and the previous token's
    layer l+1 router probs and multi-hot."""
    lp = torch.log(_probs(logits_l, ids_l, w_l, E).clamp_min(1e-6))
    return torch.cat([ng, lp, _multi_hot(ids_l, E), prev_probs, prev_hot], 1)


def fit_params(trace: Trace, gates: GateWeights, *, steps: int = 300, l2: float = 1e-4, seed: int = 0,
               progress: bool = False) -> PredictorParams:
    """Fit transition statistics, stored paths and the log-linear mix on `trace` (fit/ text only).

    progress: a progress bar on stderr over the (L-1) x `steps` optimiser steps (shown on a terminal).

    The trace needs hidden states and router logits (`tiered trace` records both by default).
    """
    if trace.hidden is None or trace.router_logits is None:
        raise ValueError("fitting needs a trace with hidden states and router logits: record it with `tiered trace` "
                         "without --no-hidden/--no-logits")
    g = torch.Generator().manual_seed(seed)
    N, L, K = trace.topk_ids.shape
    E = trace.num_experts
    hot = torch.from_numpy(trace.multi_hot()).float()  # [N, L, E]
    starts = torch.from_numpy(trace.doc_offsets[:-1])
    prev_hot = _prev(hot, starts)
    layer_trans, time_trans, prior = _transitions(hot, prev_hot)
    take = torch.randperm(N, generator=g)[:EAM_PATHS]
    paths = hot[take].clone()
    logits = torch.from_numpy(trace.router_logits.astype(np.float32))
    hidden = torch.from_numpy(trace.hidden.astype(np.float32))
    ids = torch.from_numpy(trace.topk_ids.astype(np.int64))
    prev_probs = _prev(torch.softmax(logits, -1), starts)
    mix_w = torch.zeros(L - 1, E, 5 * E)
    mix_b = torch.zeros(L - 1, E)
    from tqdm import tqdm

    bar = tqdm(total=(L - 1) * steps, desc="fitting predictors", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)  # (L-1) logistic fits of `steps` optimiser steps each
    try:
        for l in range(L - 1):
            bar.set_postfix_str(f"layer {l + 1}/{L - 1}")
            x = _mix_features(gates.logits(hidden[:, l], l + 1), logits[:, l], ids[:, l], None,
                              prev_probs[:, l + 1], prev_hot[:, l + 1], E)
            w, b = _fit_logistic(x, hot[:, l + 1], init_eye=E, steps=steps, l2=l2, tick=bar.update)
            mix_w[l], mix_b[l] = w, b
    finally:
        bar.close()
    meta = {"tokens": N, "docs": trace.doc_names, "steps": steps, "l2": l2, "seed": seed,
            "model": trace.meta.get("model"), "num_layers": L, "num_experts": E, "top_k": K}
    return PredictorParams(layer_trans, time_trans, prior, paths, mix_w, mix_b, meta)


def _transitions(hot: Tensor, prev_hot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row-normalised layer (l -> l+1) and time (t -> t+1) transition matrices and the expert prior."""
    N, L, E = hot.shape
    cnt_l = torch.einsum("nle,nlf->lef", hot[:, :-1], hot[:, 1:]) + 0.1  # [L-1, E, E]
    cnt_t = torch.einsum("nle,nlf->lef", prev_hot, hot) + 0.1  # [L, E, E]
    return cnt_l / cnt_l.sum(-1, keepdim=True), cnt_t / cnt_t.sum(-1, keepdim=True), (hot.sum(0) + 1) / (N + E)


def transition_params(trace: Trace) -> PredictorParams:
    """Only the router-history statistics (no hidden states or logits needed): what `History` uses.

    For traces without hidden states, e.g. a reference trace mapped onto a larger model (replay.py).
    The mix and stored-path fields are empty, so only the history predictor can use the result.
    """
    N, L, K = trace.topk_ids.shape
    E = trace.num_experts
    hot = torch.from_numpy(trace.multi_hot()).float()  # [N, L, E]
    layer_trans, time_trans, prior = _transitions(hot, _prev(hot, torch.from_numpy(trace.doc_offsets[:-1])))
    meta = {"tokens": N, "docs": trace.doc_names, "num_layers": L, "num_experts": E, "top_k": K,
            "transitions_only": True}
    return PredictorParams(layer_trans, time_trans, prior, torch.zeros(0, L, E), torch.zeros(L - 1, E, 5 * E),
                           torch.zeros(L - 1, E), meta)


def _fit_logistic(x: Tensor, y: Tensor, *, init_eye: int, steps: int, l2: float,
                  tick: Callable[[int], Any] | None = None) -> tuple[Tensor, Tensor]:
    """Multi-label logistic regression x [N, P] -> y [N, E] (0/1), started at identity on the first E features.

    Features are standardised while fitting and the scaling is folded back into (w, b).
    """
    mu, sd = x.mean(0), x.std(0) + 1e-4
    xn = (x - mu) / sd
    E = y.shape[1]
    lin = torch.nn.Linear(x.shape[1], E)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[:, :init_eye] = torch.eye(init_eye) * sd[:init_eye]  # start as next-gate alone
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(lin(xn), y) + l2 * lin.weight.pow(2).sum()
            loss.backward()
            opt.step()
            if tick is not None:
                tick(1)
    w = lin.weight.detach() / sd  # [E, P]
    b = lin.bias.detach() - w @ mu
    return w, b


# --------------------------------------------------------------------------- predictors
class Predictor:
    """Interface (SEAMS.md). Subclasses implement `_scores(layer)` from the state observe() keeps.

    observe(layer, hidden [T, D], routed_ids [T, K], router_logits [T, E] | None, routed_weights [T, K] | None)
    rank(layer) -> fp32 [E] scores for `layer` of the last observed token (higher = likelier).
    score_trace(trace) -> fp32 [N, L, E], the batched replay (same numbers as observe/rank, T = 1).
    """

    name = "base"
    needs_hidden = False  # observe() reads the hidden state (a device->host copy per layer on the GPU)
    needs_logits = True  # observe() reads the router logits; without them probs are the routed weights

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.L, self.E = num_layers, num_experts
        self.reset()

    def reset(self) -> None:
        """Start a new sequence: forget previous tokens."""
        self.layer = -1  # last observed layer
        self.h: Tensor | None = None  # [D] hidden after the last observed layer's attention
        self.cur_ids: Tensor | None = None  # [K] routed ids of the last observed layer
        self.cur_logits: Tensor | None = None  # [E]
        self.cur_w: Tensor | None = None  # [K]
        self.prev_probs = torch.zeros(self.L, self.E)  # previous token's router probs per layer
        self.prev_hot = torch.zeros(self.L, self.E)  # previous token's multi-hot per layer
        self.cur_probs = torch.zeros(self.L, self.E)  # this token's, filled layer by layer
        self.cur_hot = torch.zeros(self.L, self.E)
        self.started = False

    def observe(self, layer: int, hidden: Tensor, routed_ids: Tensor, router_logits: Tensor | None = None,
                routed_weights: Tensor | None = None) -> None:
        """Layer `layer` of the current forward was routed; keep what later ranks may use (last token)."""
        if layer <= self.layer and self.started:
            self.prev_probs, self.prev_hot = self.cur_probs, self.cur_hot  # a new token began
            self.cur_probs, self.cur_hot = torch.zeros(self.L, self.E), torch.zeros(self.L, self.E)
        self.started = True
        self.layer = layer
        ids = routed_ids[-1:].detach().to("cpu", torch.int64)  # [1, K]
        lg = None if router_logits is None else router_logits[-1:].detach().to("cpu", torch.float32)
        wt = None if routed_weights is None else routed_weights[-1:].detach().to("cpu", torch.float32)
        if self.needs_hidden:  # a device->host copy (and sync) per layer that the others need not pay
            self.h = hidden[-1].detach().to("cpu", torch.float32)
        self.cur_ids, self.cur_logits, self.cur_w = ids[0], None if lg is None else lg[0], None if wt is None else wt[0]
        self.cur_probs[layer] = _probs(lg, ids, wt, self.E)[0]
        self.cur_hot[layer] = _multi_hot(ids, self.E)[0]

    def rank(self, layer: int) -> Tensor:
        """Scores [E] for `layer` of the current token (layer > last observed) or, when layer <= last
        observed, of the next token."""
        if not self.started:
            return torch.zeros(self.E)
        return self._scores(layer)

    def _scores(self, layer: int) -> Tensor:
        raise NotImplementedError

    def score_trace(self, trace: Trace) -> Tensor:
        """Scores [N, L, E]: out[n, l] ranks layer l of token n with what exists before layer l-1's experts."""
        raise NotImplementedError


class NoPrediction(Predictor):
    """No prediction: C candidates drawn uniformly (a fixed pseudo-random score per token and layer)."""

    name = "none"
    needs_logits = False  # routed ids only

    def __init__(self, num_layers: int, num_experts: int, seed: int = 0) -> None:
        self.seed = seed
        super().__init__(num_layers, num_experts)

    def _scores(self, layer: int) -> Tensor:
        return torch.rand(self.E, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + layer))

    def score_trace(self, trace: Trace) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.rand(trace.num_tokens, trace.num_layers, trace.num_experts, generator=g)


class PreviousToken(Predictor):
    """Previous-token reuse: layer l+1 of token t routes like layer l+1 of token t-1 (its router probs rank the rest)."""

    name = "prev-token"

    def _scores(self, layer: int) -> Tensor:
        return self.prev_hot[layer] + self.prev_probs[layer] if layer > self.layer else \
            self.cur_hot[layer] + self.cur_probs[layer]

    def score_trace(self, trace: Trace) -> Tensor:
        hot, probs = _trace_hot_probs(trace)
        starts = torch.from_numpy(trace.doc_offsets[:-1])
        return _prev(hot + probs, starts)


def _trace_hot_probs(trace: Trace) -> tuple[Tensor, Tensor]:
    hot = torch.from_numpy(trace.multi_hot()).float()  # [N, L, E]
    if trace.router_logits is not None:
        probs = torch.softmax(torch.from_numpy(trace.router_logits.astype(np.float32)), -1)
    else:
        ids = torch.from_numpy(trace.topk_ids.astype(np.int64))
        probs = torch.zeros(hot.shape).scatter_(2, ids, torch.from_numpy(trace.topk_weights))
    return hot, probs


class NextGate(Predictor):
    """Layer l+d's norm and router applied to the hidden state after layer l's attention."""

    name = "next-gate"
    needs_hidden = True

    def __init__(self, num_layers: int, num_experts: int, gates: GateWeights) -> None:
        self.gates = gates
        super().__init__(num_layers, num_experts)

    def _scores(self, layer: int) -> Tensor:
        if layer <= self.layer:  # the next token's layer: nothing better than this token's own logits
            return self.cur_probs[layer]
        return self.gates.logits(self.h.view(1, -1), layer)[0]

    def score_trace(self, trace: Trace) -> Tensor:
        _need(trace, "hidden", self.name)
        h = torch.from_numpy(trace.hidden.astype(np.float32))  # [N, L, D]
        out = torch.zeros(trace.num_tokens, trace.num_layers, trace.num_experts)
        for l in range(1, trace.num_layers):
            out[:, l] = self.gates.logits(h[:, l - 1], l)
        _, probs = _trace_hot_probs(trace)
        out[:, 0] = _prev(probs[:, 0], torch.from_numpy(trace.doc_offsets[:-1]))
        return out


class History(Predictor):
    """Router history: P(e' at l+1 | layer l's experts) mixed with P(e at t+1 | token t's experts at l+1)."""

    name = "history"
    needs_logits = False  # routed ids only

    def __init__(self, num_layers: int, num_experts: int, params: PredictorParams, time_mix: float = 0.5) -> None:
        self.p = params
        self.time_mix = time_mix
        super().__init__(num_layers, num_experts)

    def _scores(self, layer: int) -> Tensor:
        if layer <= self.layer:
            return self.cur_hot[layer] @ self.p.time_trans[layer]
        src = self.cur_hot[self.layer] @ _chain(self.p.layer_trans, self.layer, layer)
        return (1 - self.time_mix) * src + self.time_mix * (self.prev_hot[layer] @ self.p.time_trans[layer])

    def score_trace(self, trace: Trace) -> Tensor:
        hot, prev, out = _history_start(trace, self.p)
        for l in range(1, trace.num_layers):
            out[:, l] = (1 - self.time_mix) * (hot[:, l - 1] @ self.p.layer_trans[l - 1]) + \
                self.time_mix * (prev[:, l] @ self.p.time_trans[l])
        return out


def _history_start(trace: Trace, p: PredictorParams) -> tuple[Tensor, Tensor, Tensor]:
    """Batched replay shared by the history-based predictors: multi-hot [N, L, E], the previous token's
    multi-hot, and scores with layer 0 filled from the token-to-token transitions (the rest zero)."""
    hot, _ = _trace_hot_probs(trace)
    prev = _prev(hot, torch.from_numpy(trace.doc_offsets[:-1]))
    out = torch.zeros_like(hot)
    out[:, 0] = prev[:, 0] @ p.time_trans[0]
    return hot, prev, out


def _chain(trans: Tensor, src: int, dst: int) -> Tensor:
    """Transition matrix from layer src to layer dst > src: product of one-layer steps [E, E]."""
    m = trans[src]
    for l in range(src + 1, dst):
        m = m @ trans[l]
    return m


class ActivationMatching(Predictor):
    """MoE-Infinity's idea per token: match this token's routing so far (layers <= l) against stored
    paths from fit/ text (cosine) and average the next layer of the nearest ones."""

    name = "activation-matching"
    needs_logits = False  # routed ids only

    def __init__(self, num_layers: int, num_experts: int, params: PredictorParams,
                 neighbours: int = EAM_NEIGHBOURS) -> None:
        self.p = params
        self.k = neighbours
        super().__init__(num_layers, num_experts)

    def _match(self, partial: Tensor, upto: int, target: int) -> Tensor:
        """partial [T, upto+1, E] -> mean of the nearest stored paths' layer `target` [T, E]."""
        lib = self.p.paths[:, :upto + 1].reshape(self.p.paths.shape[0], -1)  # [M, (l+1)E]
        sim = partial.reshape(partial.shape[0], -1) @ lib.T  # [T, M]; equal norms: dot = cosine * const
        top = sim.topk(min(self.k, lib.shape[0]), -1).indices  # [T, k]
        return self.p.paths[top, target].mean(1)  # [T, E]

    def _scores(self, layer: int) -> Tensor:
        if layer <= self.layer:
            return self.cur_hot[layer] @ self.p.time_trans[layer]
        return self._match(self.cur_hot[None, :self.layer + 1], self.layer, layer)[0]

    def score_trace(self, trace: Trace) -> Tensor:
        hot, _, out = _history_start(trace, self.p)
        for l in range(1, trace.num_layers):
            out[:, l] = self._match(hot[:, :l], l - 1, l)
        return out


class Combined(Predictor):
    """Log-linear mix fitted on fit/: next-gate logits, layer l's router, previous token's layer l+1.

    Depth d > 1 (prefetch further ahead) falls back to next-gate on layer l+d's router.
    """

    name = "combined"
    needs_hidden = True
    needs_logits = True

    def __init__(self, num_layers: int, num_experts: int, gates: GateWeights, params: PredictorParams) -> None:
        self.gates, self.p = gates, params
        super().__init__(num_layers, num_experts)

    def _scores(self, layer: int) -> Tensor:
        if layer <= self.layer:
            return self.cur_probs[layer]
        ng = self.gates.logits(self.h.view(1, -1), layer)  # [1, E]
        if layer != self.layer + 1:
            return ng[0]
        x = _mix_features(ng, None if self.cur_logits is None else self.cur_logits[None], self.cur_ids[None],
                          None if self.cur_w is None else self.cur_w[None], self.prev_probs[layer][None],
                          self.prev_hot[layer][None], self.E)
        return (x @ self.p.mix_w[layer - 1].T + self.p.mix_b[layer - 1])[0]

    def score_trace(self, trace: Trace) -> Tensor:
        _need(trace, "hidden", self.name)
        hot, probs = _trace_hot_probs(trace)
        starts = torch.from_numpy(trace.doc_offsets[:-1])
        prev_hot, prev_probs = _prev(hot, starts), _prev(probs, starts)
        h = torch.from_numpy(trace.hidden.astype(np.float32))
        ids = torch.from_numpy(trace.topk_ids.astype(np.int64))
        lg = None if trace.router_logits is None else torch.from_numpy(trace.router_logits.astype(np.float32))
        w = torch.from_numpy(trace.topk_weights)
        out = torch.zeros_like(hot)
        out[:, 0] = prev_probs[:, 0]
        for l in range(1, trace.num_layers):
            x = _mix_features(self.gates.logits(h[:, l - 1], l), None if lg is None else lg[:, l - 1], ids[:, l - 1],
                              w[:, l - 1], prev_probs[:, l], prev_hot[:, l], self.E)
            out[:, l] = x @ self.p.mix_w[l - 1].T + self.p.mix_b[l - 1]
        return out


def _need(trace: Trace, what: str, name: str) -> None:
    if getattr(trace, what) is None:
        raise ValueError(f"predictor {name!r} needs the trace's {what}: record it with `tiered trace` (default keeps it)")


PREDICTORS = ("none", "prev-token", "next-gate", "history", "activation-matching", "combined")


def make_predictor(name: str, *, num_layers: int, num_experts: int, gates: GateWeights | None = None,
                   params: PredictorParams | None = None) -> Predictor:
    """A predictor by name (PREDICTORS); next-gate/combined need `gates`, history/matching/combined `params`."""
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}: choose one of {list(PREDICTORS)}")
    if name in ("next-gate", "combined") and gates is None:
        raise ValueError(f"predictor {name!r} needs the model's dense weights (GateWeights.from_layout)")
    if name in ("history", "activation-matching", "combined") and params is None:
        raise ValueError(f"predictor {name!r} needs fitted parameters: run `tiered tune --fit-trace FIT.npz` "
                         f"(a trace of text kept apart from the text you report on) to write {PARAMS_FILE}")
    L, E = num_layers, num_experts
    return {"none": lambda: NoPrediction(L, E), "prev-token": lambda: PreviousToken(L, E),
            "next-gate": lambda: NextGate(L, E, gates), "history": lambda: History(L, E, params),
            "activation-matching": lambda: ActivationMatching(L, E, params),
            "combined": lambda: Combined(L, E, gates, params)}[name]()


# --------------------------------------------------------------------------- metrics
def recall_precision(scores: Tensor, trace: Trace, candidates: int, *, layers: range | None = None) -> dict:
    """Next-layer recall and precision with C candidates: correct / K used, correct / C (docs/metrics.md).

    scores [N, L, E] from score_trace; layers defaults to 1..L-1 (layer 0 has no layer before it).
    Returns {"recall", "precision", "per_layer": [recall of each layer]}.
    """
    layers = layers if layers is not None else range(1, trace.num_layers)
    hot = torch.from_numpy(trace.multi_hot())
    correct = used = 0
    per = []
    for l in layers:
        top = scores[:, l].topk(candidates, -1).indices  # [N, C]
        c = int(torch.gather(hot[:, l], 1, top).sum())
        u = int(hot[:, l].sum())
        per.append(c / u if u else 0.0)
        correct += c
        used += u
    n = trace.num_tokens * len(layers)
    return {"recall": correct / used if used else 0.0, "precision": correct / (n * candidates) if n else 0.0,
            "per_layer": per}
