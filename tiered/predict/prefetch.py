"""Prefetch glue between the predictor and the expert cache, and predictor-informed eviction.

Owns: `Prefetcher` (a routing observer: during layer l it feeds the predictor and chooses the top
candidates for layers l+1 .. l+d within a per-layer budget; its `prefetch_hook` sends them to
`provider.prefetch()` right after layer l's own `get()`, when layer l's experts are pinned and cannot be
evicted by the prefetch), `prefetcher_for_layout` (the one `load()` builds), `EvictionScorer` (keep-scores
of experts from the routers, for the store's `ScoredEviction` policy) and `PredictedEviction` (that policy
with its own scorer, for the simulator and offline tools).
Does not own: the predictors (predictors.py), the eviction policy itself (store/policy.py), the slots and
copies (store/cache.py), the simulator (simulate.py, which uses `choose` and `PredictedEviction` so
offline numbers come from this code).

Prefetch runs only on one-token steps (decode): prefill streams each chunk's union of experts in
waves, so there is nothing to guess there. Prefetch is a hint: it never changes the model's output.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tiered.model.moe import Observer
from tiered.predict.predictors import PARAMS_FILE, GateWeights, Predictor, PredictorParams, make_predictor
from tiered.store.policy import ScoredEviction


def choose(scores: Tensor, budget: int) -> Tensor:
    """The `budget` highest-scoring expert ids (int64 [budget])."""
    return scores.topk(min(budget, scores.numel())).indices


# (decay per token, weight of log averaged router prob, weight of log averaged use). Chosen on traces of
# fitting text (never the reported text) with simulate.py (per-layer caches of 16 slots): an average of uses over ~50 tokens
# plus this token's router probability. Single averages of probs (decay 0.3..0.97) scored 1-4 points lower.
DEFAULT_EVICT_MIX = ((0.98, 0.0, 1.0), (0.0, 0.1, 0.0))


class EvictionScorer:
    """Keep-scores of experts from the routers, for the store's `ScoredEviction` policy.

    The score is a log-linear mix of exponential averages over tokens of each layer's router probabilities
    and uses (`update(layer, probs, used)` from the routing observer, before that layer's experts are
    fetched), so only the past and the current router output are read (lead-time rule).
    """

    def __init__(self, num_layers: int, num_experts: int, *,
                 mix: tuple[tuple[float, float, float], ...] | None = None) -> None:
        mix = DEFAULT_EVICT_MIX if mix is None else mix
        if not mix or any(not 0 <= m[0] < 1 for m in mix):
            raise ValueError(f"mix must be (decay in [0, 1), w_prob, w_use) terms, got {mix}")
        n = num_layers * num_experts
        self.E = num_experts
        self.mix = mix  # (decay, weight on log averaged prob, weight on log averaged use) terms
        # only the averages with a nonzero weight are kept: (decay [Mp, 1], weight [Mp, 1]) for probs and uses
        self._p = [np.array([[m[i]] for m in self.mix if m[j] != 0]) for i, j in ((0, 1), (1, 1))]
        self._u = [np.array([[m[i]] for m in self.mix if m[j] != 0]) for i, j in ((0, 2), (2, 2))]
        self.avg_p = np.zeros((len(self._p[0]), n))  # [Mp, L*E] averaged router probs
        self.avg_u = np.zeros((len(self._u[0]), n))  # [Mu, L*E] averaged use (top-k membership)

    def update(self, layer: int, probs: Tensor | np.ndarray, used: Tensor | np.ndarray | None = None) -> np.ndarray:
        """probs [E]: this token's router probabilities at `layer`; used [E] 0/1 (None = 0).
        Returns the layer's new scores [E] (higher = keep). Vectorised over experts."""
        p = probs.detach().float().cpu().numpy() if isinstance(probs, Tensor) else np.asarray(probs)
        u = np.zeros_like(p) if used is None else (used.detach().float().cpu().numpy() if isinstance(used, Tensor)
                                                   else np.asarray(used, dtype=float))
        sl = slice(layer * self.E, (layer + 1) * self.E)
        score = np.zeros(self.E)
        for avg, (d, w), x in ((self.avg_p, self._p, p), (self.avg_u, self._u, u)):
            if len(avg):
                a = avg[:, sl]  # a view: updated in place
                a *= d
                a += (1 - d) * x
                score += (w * np.log(np.maximum(a, 1e-4))).sum(0)
        return score


class PredictedEviction(ScoredEviction):
    """A `ScoredEviction` with its own `EvictionScorer`: `update(layer, probs, used)` scores and stores in one
    call. The simulator and offline tools use it; the engine keeps the two apart (the cache owns the policy,
    the prefetcher owns the scorer)."""

    def __init__(self, num_layers: int, num_experts: int, *,
                 mix: tuple[tuple[float, float, float], ...] | None = None) -> None:
        super().__init__(num_layers, num_experts)
        self.scorer = EvictionScorer(num_layers, num_experts, mix=mix)

    def update(self, layer: int, probs: Tensor | np.ndarray, used: Tensor | np.ndarray | None = None) -> None:
        self.set_scores(layer, self.scorer.update(layer, probs, used))


class Prefetcher(Observer):
    """Routing observer: feeds the predictor, queues the candidates for the next `depth` layers, and issues
    them from its `prefetch_hook` (give both to the model when it is built).

    Per layer of a one-token step the model calls observer.on_route(l) -> provider.get(l) -> prefetch_hook(l),
    so the candidates for layers l+1..l+depth go to provider.prefetch() once layer l's own experts are pinned,
    and their copies overlap layer l's compute (eager and piecewise alike).

    Args:
        predictor: any Predictor (reset per sequence by the caller, or by `reset()`).
        provider: where candidates are prefetched (its `prefetch(layer, ids)`).
        depth: layers ahead (l+1 .. l+depth within the token); 0 = only feed the eviction scores.
        budget: candidates per target layer (C).
        eviction: the store's ScoredEviction policy to keep scored (the cache's --policy predicted), if any.
        chain: another observer to call first (e.g. a TraceRecorder).
        chain_hook: another prefetch hook to call first.
        moe_layers: the model layer of each of the predictor's L layers (ModelConfig.moe_layers); None = 0..L-1
            (every layer routes). The model calls on_route and the hook with model layers; the predictor sees
            MoE-layer indices, so "the next layer" is the next MoE layer, and a dense layer is never a target.
        num_layers: the model's layers, for the eviction scores (keys layer * E + expert over model layers);
            None = the last MoE layer + 1.
    """

    def __init__(self, predictor: Predictor, provider: Any, *, depth: int = 1, budget: int = 8,
                 eviction: ScoredEviction | None = None, chain: Any = None, chain_hook: Any = None,
                 moe_layers: list[int] | None = None, num_layers: int | None = None) -> None:
        self.predictor = predictor
        self.provider = provider
        self.depth = depth
        self.budget = budget
        self.eviction = eviction
        self.moe_layers = list(range(predictor.L)) if moe_layers is None else [int(l) for l in moe_layers]
        if len(self.moe_layers) != predictor.L:
            raise ValueError(f"the predictor has {predictor.L} layers but moe_layers lists {len(self.moe_layers)} "
                             f"({self.moe_layers}): build it with num_layers=len(config.moe_layers)")
        self._index = {l: i for i, l in enumerate(self.moe_layers)}  # model layer -> predictor layer
        n_model = num_layers if num_layers is not None else self.moe_layers[-1] + 1
        self.scorer = None if eviction is None else EvictionScorer(n_model, predictor.E)
        self.chain = chain
        self.chain_hook = chain_hook
        self.pending: list[tuple[int, Tensor]] = []  # (layer, ids) to prefetch after the current get()
        self.issued = 0  # candidates handed to prefetch()

    @property
    def prefetching(self) -> bool:
        """False when this observer only feeds the eviction policy (then the predictor is not consulted)."""
        return self.depth > 0 and self.budget > 0

    @property
    def deferrable(self) -> bool:
        """No hidden state needed and nothing chained that must run first: the piecewise step may call on_route,
        and then the prefetch hook, after enqueuing the next segment, so this host work and the prefetch copies
        overlap its compute. Two effects, both measured with simulate.py: the eviction policy's scores for
        layer l include layer l's own router output from the next token on, a step later than on the eager
        path and in the simulator (-0.1 point of hit rate on the reference model's per-layer caches, -0.3 on
        the mapped trace's global cache); prefetches for layer l+1 start after layer l's demand copies."""
        return not self.needs_hidden and (self.chain is None or self.chain.deferrable)

    @property
    def needs_hidden(self) -> bool:
        """What the piecewise step must copy to the host for this observer (and the one it chains to)."""
        return ((self.prefetching and self.predictor.needs_hidden) or
                (self.chain is not None and self.chain.needs_hidden))

    @property
    def needs_logits(self) -> bool:
        return ((self.prefetching and self.predictor.needs_logits) or self.eviction is not None or
                (self.chain is not None and self.chain.needs_logits))

    def reset(self) -> None:
        self.predictor.reset()
        self.pending = []

    def on_route(self, layer: int, hidden: Tensor, topk_ids: Tensor, topk_weights: Tensor,
                 router_logits: Tensor | None) -> None:
        if self.chain is not None:
            self.chain.on_route(layer, hidden, topk_ids, topk_weights, router_logits)
        if self.eviction is not None:  # numpy on one row: a few microseconds per layer
            lg = router_logits[-1].detach().to("cpu", torch.float32).numpy()
            p = np.exp(lg - lg.max())
            used = np.zeros(lg.shape[-1])
            used[topk_ids[-1].detach().cpu().numpy()] = 1.0
            self.eviction.set_scores(layer, self.scorer.update(layer, p / p.sum(), used))
        self.pending = []
        if not self.prefetching:
            return
        i = self._index[layer]  # the predictor's layer (the i-th MoE layer)
        if i == 0 and hidden.shape[0] > 1:
            self.predictor.reset()  # a prefill chunk from position 0 may start a new sequence
        self.predictor.observe(i, hidden, topk_ids, router_logits, topk_weights)
        if hidden.shape[0] != 1:
            return
        L = self.predictor.L
        for tgt in range(i + 1, min(L, i + 1 + self.depth)):  # queued as model layers, for provider.prefetch
            self.pending.append((self.moe_layers[tgt], choose(self.predictor.rank(tgt), self.budget)))

    def take(self, layer: int) -> list[tuple[int, Tensor]]:
        """The queued prefetches made while routing `layer` (emptied)."""
        out, self.pending = self.pending, []
        self.issued += sum(int(ids.numel()) for _, ids in out)
        return out

    def prefetch_hook(self, layer: int, expert_ids: Tensor) -> None:
        """The model's prefetch hook (moe.PrefetchHook): issue the candidates queued while routing `layer`."""
        if self.chain_hook is not None:
            self.chain_hook(layer, expert_ids)
        for tgt, ids in self.take(layer):
            self.provider.prefetch(tgt, ids)


def prefetcher_for_layout(layout: Any, provider: Any, *, depth: int, budget: int | None,
                          eviction: ScoredEviction | None = None, predictor: Predictor | None = None,
                          chain: Any = None, chain_hook: Any = None) -> Prefetcher:
    """The prefetcher `load()` builds for --prefetch-depth / --policy predicted. The predictor, unless given:
    the fitted combined predictor when the layout has its parameters (`tiered tune --fit-trace` writes them),
    else next-gate (needs only the model's routers); with depth 0 (only feeding the eviction scores) a
    predictor that reads nothing. budget: candidates per layer, default C = 1.5 K."""
    cfg = layout.config
    pred = predictor if predictor is not None else default_predictor(layout, depth)
    c = int(budget) if budget else (3 * cfg.top_k) // 2
    return Prefetcher(pred, provider, depth=depth, budget=c, eviction=eviction, chain=chain, chain_hook=chain_hook,
                      moe_layers=cfg.moe_layers, num_layers=cfg.num_layers)


def default_predictor(layout: Any, depth: int) -> Predictor:
    """combined when the layout has fitted parameters, else next-gate; "none" when depth is 0. Its layers are
    the model's MoE layers (ModelConfig.moe_layers)."""
    cfg = layout.config
    params_path = Path(layout.path) / PARAMS_FILE
    params = PredictorParams.load(params_path) if params_path.is_file() else None
    name = "combined" if params is not None and params.mix_w.numel() else "next-gate"
    if depth <= 0:
        name = "none"
    return make_predictor(name, num_layers=len(cfg.moe_layers), num_experts=cfg.num_experts,
                          gates=GateWeights.from_layout(layout), params=params)
