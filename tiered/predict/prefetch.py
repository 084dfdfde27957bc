"""Prefetch glue between the predictor and the expert cache, and predictor-informed eviction.

Owns: `Prefetcher` (a routing observer: during layer l it feeds the predictor and chooses the top
candidates for layers l+1 .. l+d within a per-layer budget), `attach` (sets it as the engine's
observer and sends its candidates to `provider.prefetch()` from the model's prefetch hook, right after
layer l's own `get()`, when layer l's experts are pinned and cannot be evicted by the prefetch), and `PredictedEviction` (a Policy, same API as store/policy.py, that evicts the resident
expert least likely to be used soon).
Does not own: the predictors (predictors.py), the slots and copies (store/cache.py), the simulator
(simulate.py, which uses `choose` and `PredictedEviction` so offline numbers come from this code).

Prefetch runs only on one-token steps (decode): prefill streams each chunk's union of experts in
waves, so there is nothing to guess there. Prefetch is a hint: it never changes the model's output.
"""
from __future__ import annotations

from typing import Any, Collection, Iterable

import numpy as np
import torch
from torch import Tensor

from tiered.predict.predictors import Predictor
from tiered.store.policy import Policy


def choose(scores: Tensor, budget: int) -> Tensor:
    """The `budget` highest-scoring expert ids (int64 [budget])."""
    return scores.topk(min(budget, scores.numel())).indices


# (decay per token, weight of log averaged router prob, weight of log averaged use). Chosen on traces of
# ../shared/text/fit with simulate.py (per-layer caches of 16 slots): an average of uses over ~50 tokens
# plus this token's router probability. Single averages of probs (decay 0.3..0.97) scored 1-4 points lower.
DEFAULT_EVICT_MIX = ((0.98, 0.0, 1.0), (0.0, 0.1, 0.0))


class PredictedEviction(Policy):
    """Evict the resident expert least likely to be needed soon; LRU order breaks ties.

    The likelihood is a log-linear score of exponential averages over tokens of each layer's router
    probabilities and uses (`update(layer, probs, used)` from the routing observer, before that layer's
    experts are fetched), so only the past and the current router output are read (lead-time rule).
    Keys are layer * E + expert, like every policy.

    State is arrays over all L*E keys (resident mask, score, LRU sequence number), so `update` and
    `victim` are a few numpy operations each, with no Python loop over experts or residents.
    """

    name = "predicted"

    def __init__(self, num_layers: int, num_experts: int, *,
                 mix: tuple[tuple[float, float, float], ...] | None = None) -> None:
        super().__init__()
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
        self.score = np.zeros(n)  # [L*E] higher = keep
        self.resident = np.zeros(n, dtype=bool)  # [L*E] tracked keys
        self.seq = np.zeros(n, dtype=np.int64)  # [L*E] order of the last insert/touch (LRU tie-break)
        self._next = 0
        self._count = 0

    def update(self, layer: int, probs: Tensor | np.ndarray, used: Tensor | np.ndarray | None = None) -> None:
        """probs [E]: this token's router probabilities at `layer`; used [E] 0/1 (default: probs' top-k
        is not known here, so 0). Vectorised over experts."""
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
        self.score[sl] = score

    def _stamp(self, key: int) -> None:
        self._next += 1
        self.seq[key] = self._next

    def insert(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_absent(key)
        self.resident[key] = True
        self._count += 1
        self._stamp(key)

    def touch(self, key: int, t: float) -> None:
        self._clock(t)
        self._check_present(key, "touch")
        self._stamp(key)

    def remove(self, key: int) -> None:
        self._check_present(key, "remove")
        self.resident[key] = False
        self._count -= 1

    def victim(self, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> int:
        return self.victims(1, resident, pinned)[0]

    def victims(self, n: int, resident: Iterable[int] | None = None, pinned: Collection[int] = ()) -> list[int]:
        """The n lowest scores among evictable keys, least recently used first among equal scores."""
        cand = self._as_set(resident)
        mask = self.resident
        if (cand is not None and len(cand) != self._count) or pinned:
            mask = mask.copy()
            if cand is not None and len(cand) != self._count:  # a subset of the tracked keys
                sub = np.zeros_like(mask)
                sub[np.fromiter(cand, dtype=np.int64, count=len(cand))] = True
                mask &= sub
            if pinned:
                mask[np.fromiter(pinned, dtype=np.int64, count=len(pinned))] = False
        idx = np.flatnonzero(mask)
        if idx.size < n:
            raise self._none_left(cand, pinned)
        order = np.lexsort((self.seq[idx], self.score[idx]))[:n]  # by score, then by age
        return idx[order].tolist()

    def __contains__(self, key: int) -> bool:
        return 0 <= key < self.resident.size and bool(self.resident[key])

    def __len__(self) -> int:
        return self._count


class Prefetcher:
    """Routing observer: feeds the predictor and queues the candidates for the next `depth` layers.

    Args:
        predictor: any Predictor (reset per sequence by the caller, or by `reset()`).
        depth: layers ahead (l+1 .. l+depth within the token).
        budget: candidates per target layer (C).
        eviction: a PredictedEviction to keep informed, if the cache uses one.
        chain: another observer to call as well (e.g. a TraceRecorder).
    """

    def __init__(self, predictor: Predictor, *, depth: int = 1, budget: int = 8,
                 eviction: PredictedEviction | None = None, chain: Any = None) -> None:
        self.predictor = predictor
        self.depth = depth
        self.budget = budget
        self.eviction = eviction
        self.chain = chain
        self.pending: list[tuple[int, Tensor]] = []  # (layer, ids) to prefetch after the current get()
        self.issued = 0  # candidates handed to prefetch()
        self.saved_hook: Any = None  # the model's prefetch hook before attach() (restored by detach())

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
        the mapped trace's global cache); prefetches for layer l+1 start after layer l's demand copies, as before."""
        return not self.needs_hidden and (self.chain is None or getattr(self.chain, "deferrable", False))

    @property
    def needs_hidden(self) -> bool:
        """What the piecewise step must copy to the host for this observer (and the one it chains to)."""
        return ((self.prefetching and self.predictor.needs_hidden) or
                (self.chain is not None and getattr(self.chain, "needs_hidden", True)))

    @property
    def needs_logits(self) -> bool:
        return ((self.prefetching and self.predictor.needs_logits) or self.eviction is not None or
                (self.chain is not None and getattr(self.chain, "needs_logits", True)))

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
            self.eviction.update(layer, p / p.sum(), used)
        self.pending = []
        if not self.prefetching:
            return
        if layer == 0 and hidden.shape[0] > 1:
            self.predictor.reset()  # a prefill chunk from position 0 may start a new sequence
        self.predictor.observe(layer, hidden, topk_ids, router_logits, topk_weights)
        if hidden.shape[0] != 1:
            return
        L = self.predictor.L
        for tgt in range(layer + 1, min(L, layer + 1 + self.depth)):
            self.pending.append((tgt, choose(self.predictor.rank(tgt), self.budget)))

    def take(self, layer: int) -> list[tuple[int, Tensor]]:
        """The queued prefetches made while routing `layer` (emptied)."""
        out, self.pending = self.pending, []
        self.issued += sum(int(ids.numel()) for _, ids in out)
        return out


def attach(engine: Any, predictor: Predictor, *, depth: int = 1, budget: int = 8,
           eviction: PredictedEviction | None = None) -> Prefetcher:
    """Wire `predictor` into `engine`: the observer feeds it, the model's prefetch hook issues its candidates.

    Per layer of a one-token step the engine calls observer.on_route(l) -> provider.get(l) ->
    prefetch_hook(l), so the candidates for layers l+1..l+depth go to provider.prefetch() once layer l's
    own experts are pinned, and their copies overlap layer l's compute (eager and piecewise alike).
    `eviction`, when given, is kept informed of every layer's router output (the cache's --policy predicted).
    Returns the Prefetcher; `detach` undoes it.
    """
    pf = Prefetcher(predictor, depth=depth, budget=budget, eviction=eviction, chain=engine.model.observer)
    model = engine.model
    pf.saved_hook = model.prefetch_hook

    def hook(layer: int, expert_ids: Tensor) -> None:
        if pf.saved_hook is not None:
            pf.saved_hook(layer, expert_ids)
        for tgt, ids in pf.take(layer):
            model.provider.prefetch(tgt, ids)

    model.observer = pf
    model.prefetch_hook = hook
    return pf


def detach(engine: Any) -> None:
    """Undo `attach`."""
    model = engine.model
    pf = model.observer
    if isinstance(pf, Prefetcher):
        model.observer = pf.chain
        model.prefetch_hook = pf.saved_hook
