"""Replayed routing: make a random-weight model route like a recorded trace (benchmark mode).

Random weights route almost uniformly, so no cache policy or predictor can be judged on them. For
bandwidth benchmarks on a large random model, the router's choice is replaced by a recorded trace of
the trained reference model, mapped onto the large model's layers and experts.

Owns: `map_trace` (the documented, deterministic mapping), `map_predictions` (a next-gate predictor's candidates
mapped the same way), `ReplayRouting` (the override the model calls instead of its router) and `ReplayBank` (many
rows' routing concatenated on the device, each row a ReplayRouting over views of it, so a graphed batch step can
gather every row's routing in one index: decode/batchgraph.py). Does not own: recording traces (trace.py) or the
model.

The mapping (no lookahead: token t of the mapped trace is made only from token t of the source):
    source: L layers, E experts, top-K;   target: L' = H*L layers, E' = H*E experts, the same K,
    where H = L'/L (the 10.6B Qwen3-MoE shape from olmoe-code-17m: H = 2).
    target layer l' = h*L + l  (h = l' // L, l = l' % L) takes source layer l of source stream h;
    target expert   e' = H*e + h.
    Stream h is the source trace shifted by h documents (document d of stream h is source document
    (d + h) mod ND), truncated to the shortest, so the two halves of the model see different text and
    each target layer uses E of its E' experts with the source layer's reuse and co-occurrence
    structure. Routing weights are copied with the ids.

`map_routing` is the mapping onto a much finer model with another top-k (Qwen3.5-397B-A17B: 60 layers, 512
experts, top-10, or its cut to top-4, from olmoe-code-17m: 8 layers, 64 experts, top-8). Also no lookahead, and
deterministic:
    layers   target layer l' takes source layer l = l' mod L of stream s = l' // L (document d of stream s is
             source document (d + s) mod ND), as above; every document is cut to the shortest of its streams.
    top-k    the K' experts of a target row are the source router's K' best at that token and layer: the first
             K' of the recorded top-k when K' <= K, else the top-K' of the recorded router logits (the trace must
             keep them); their weights are the router probabilities, renormalised to sum 1 (Qwen3.5's rule).
    experts  each source expert e owns a group of G = E'/E target experts, G*e .. G*e + G-1; which one a use
             lands on is a hash of (target layer, e, t // segment), or, for a `jitter` share of the uses (also
             chosen by hash), of (target layer, e, t). Across segments the group's members take turns, so over a
             document a target layer touches most of its E' experts, not E of them (e' = G*e + h for a fixed h
             would leave a 512-expert layer a working set of 64 and overstate every cache's hit rate); the
             per-token draws lower the reuse of an expert at t+1 (the reference's own: 39% at top-8, 42% mapped
             to top-10) to the one published figure of the real 397B's routing, Flash-MoE's previous-token
             predictor hit rate of 25.6% at K=10. Defaults segment = 128, jitter = 0.25, measured on the five
             eval files mapped to 60 x 512: t+1 reuse 25.9% at K=10 (17.8% at K=4), 438 of 512 experts touched
             per layer and document at K=10 (351 at K=4). The member never depends on the rank, so a row's top-4
             is a subset of its top-10 (the --experts-per-token cut of the same model).
`uniform_routing` is the pessimistic case: every row K' distinct experts drawn uniformly, weights 1/K'.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from tiered.predict.trace import Trace

if TYPE_CHECKING:
    from tiered.predict.predictors import GateWeights


def map_trace(trace: Trace, *, num_layers: int, num_experts: int) -> Trace:
    """Map `trace` (L layers, E experts) onto num_layers = H*L, num_experts = H*E (see module doc)."""
    L, E = trace.num_layers, trace.num_experts
    if num_layers % L or num_experts % E or num_layers // L != num_experts // E:
        raise ValueError(f"cannot map {L} layers x {E} experts onto {num_layers} x {num_experts}: "
                         f"both must be the same multiple H of the source")
    H = num_layers // L
    docs = [trace.doc(d) for d in range(trace.num_docs)]
    ND = len(docs)
    ids_out, w_out, tok_out, offs = [], [], [], [0]
    for d in range(ND):
        streams = [docs[(d + h) % ND] for h in range(H)]
        n = min(s.num_tokens for s in streams)
        ids = np.empty((n, num_layers, trace.top_k), dtype=np.int16)
        w = np.empty((n, num_layers, trace.top_k), dtype=np.float32)
        for h, s in enumerate(streams):
            ids[:, h * L:(h + 1) * L] = s.topk_ids[:n].astype(np.int32) * H + h
            w[:, h * L:(h + 1) * L] = s.topk_weights[:n]
        ids_out.append(ids)
        w_out.append(w)
        tok_out.append(streams[0].tokens[:n])
        offs.append(offs[-1] + n)
    return Trace(tokens=np.concatenate(tok_out), doc_offsets=np.asarray(offs, dtype=np.int64),
                 topk_ids=np.concatenate(ids_out), topk_weights=np.concatenate(w_out),
                 meta={**trace.meta, "num_layers": num_layers, "num_experts": num_experts,
                       "mapped_from": {"num_layers": L, "num_experts": E, "H": H}})


class ReplayRouting:
    """The router override (Transformer.routing): position p routes as row p of a trace.

    Called as routing(layer, start, T) for positions start..start+T-1; stateless, so warm-ups and
    graph captures that run a step twice see the same rows. No lookahead: row p is the routing the
    source model chose at position p. One made by `ReplayBank.routing` reads views of the bank's arrays:
    `bank` is that bank and `base` the bank row of its position 0 (a graphed batch step gathers bank row
    base + position on the device); one made here has bank None, base 0.
    """

    def __init__(self, topk_ids: np.ndarray, topk_weights: np.ndarray, *, device: torch.device | str,
                 moe_layers: list[int] | None = None) -> None:
        """moe_layers: the model layer of each of the arrays' L layers (Trace.moe_layers, for a model with dense
        layers); None = array layer l is model layer l."""
        ids_host = torch.as_tensor(topk_ids.astype(np.int64))  # [N, L, K] (the host reads rows without a sync)
        weights_host = torch.as_tensor(topk_weights, dtype=torch.float32)  # [N, L, K]
        self._set(ids_host, weights_host, ids_host.to(device), weights_host.to(device), moe_layers)
        self.bank: ReplayBank | None = None
        self.base = 0

    @classmethod
    def _of_bank(cls, bank: ReplayBank, i: int) -> ReplayRouting:
        """Member i of `bank`: views of its rows base..base+n-1 (no copy)."""
        r = cls.__new__(cls)
        a, b = bank.bases[i], bank.bases[i + 1]
        r._set(bank.ids_host[a:b], bank.weights_host[a:b], bank.ids[a:b], bank.weights[a:b], bank.moe_layers)
        r.bank, r.base = bank, a
        return r

    def _set(self, ids_host: Tensor, weights_host: Tensor, ids: Tensor, weights: Tensor,
             moe_layers: list[int] | None) -> None:
        self.ids_host, self.weights_host = ids_host, weights_host  # [N, L, K] int64, fp32 on the host
        self.ids, self.weights = ids, weights  # the same on the device
        self._index = _layer_index(moe_layers, ids_host.shape[1])

    def _layer(self, layer: int) -> int:
        return _array_layer(self._index, layer)

    def __call__(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]:
        """ids [T, K] int64 and weights [T, K] fp32 of model layer `layer` for positions start..start+T-1 (on the
        device)."""
        self._check(start, T)
        i = self._layer(layer)
        return self.ids[start:start + T, i], self.weights[start:start + T, i]

    def host(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]:
        """The same rows as __call__, on the host (CPU tensors: no device sync to read them)."""
        self._check(start, T)
        i = self._layer(layer)
        return self.ids_host[start:start + T, i], self.weights_host[start:start + T, i]

    def _check(self, start: int, T: int) -> None:
        if start + T > self.ids.shape[0]:
            raise IndexError(f"replayed routing has {self.ids.shape[0]} positions; position {start + T - 1} asked "
                             f"for: use a longer trace or fewer tokens")


class ReplayBank:
    """Several rows' replayed routing in one pair of device arrays, so that one CUDA graph can serve them all.

    ids [N, L, K] int64 and weights [N, L, K] fp32 are the members' arrays concatenated over positions (N their
    total length); member i's position p is bank row bases[i] + p. `routing(i)` is member i as a ReplayRouting
    (views of these arrays: it answers exactly as one built from member i's arrays). A graphed batch step
    (decode/batchgraph.py) gathers bank rows on the device instead of calling each row's routing on the host.
    Every member shares the layer mapping `moe_layers` (see ReplayRouting).
    """

    def __init__(self, topk_ids: Sequence[np.ndarray], topk_weights: Sequence[np.ndarray], *,
                 device: torch.device | str, moe_layers: list[int] | None = None) -> None:
        """topk_ids / topk_weights: per member, [n_i, L, K] arrays (the same L and K for all)."""
        if len(topk_ids) != len(topk_weights) or not topk_ids:
            raise ValueError(f"a replay bank needs one weights array per ids array and at least one member, got "
                             f"{len(topk_ids)} ids and {len(topk_weights)} weights arrays")
        shape = topk_ids[0].shape[1:]
        for i, (a, w) in enumerate(zip(topk_ids, topk_weights)):
            if a.ndim != 3 or a.shape[1:] != shape or w.shape != a.shape:
                raise ValueError(f"member {i} of the replay bank has ids {a.shape} and weights {w.shape}; every "
                                 f"member needs ids and weights of shape [n, {shape[0]}, {shape[1]}]")
        self.ids_host = torch.as_tensor(np.concatenate([a.astype(np.int64) for a in topk_ids]))  # [N, L, K]
        self.weights_host = torch.as_tensor(np.concatenate(topk_weights), dtype=torch.float32)  # [N, L, K]
        self.ids = self.ids_host.to(device)
        self.weights = self.weights_host.to(device)
        self.bases = np.concatenate([[0], np.cumsum([len(a) for a in topk_ids])]).tolist()  # [members + 1]
        self.moe_layers = None if moe_layers is None else [int(m) for m in moe_layers]
        self._index = _layer_index(self.moe_layers, self.ids_host.shape[1])

    def __len__(self) -> int:
        """Members."""
        return len(self.bases) - 1

    def routing(self, i: int) -> ReplayRouting:
        """Member i's routing (its position p is bank row `base` + p)."""
        if not 0 <= i < len(self):
            raise IndexError(f"the replay bank has {len(self)} members, member {i} asked for")
        return ReplayRouting._of_bank(self, i)

    def layer(self, layer: int) -> int:
        """The bank's array layer of model layer `layer` (IndexError when the bank does not replay it)."""
        return _array_layer(self._index, layer)


def _layer_index(moe_layers: list[int] | None, L: int) -> dict[int, int] | None:
    """model layer -> array layer, or None when array layer l is model layer l."""
    if moe_layers is None:
        return None
    if len(moe_layers) != L:
        raise ValueError(f"moe_layers lists {len(moe_layers)} layers for routing arrays of {L}")
    return {int(m): i for i, m in enumerate(moe_layers)}


def _array_layer(index: dict[int, int] | None, layer: int) -> int:
    if index is None:
        return layer
    if layer not in index:
        raise IndexError(f"model layer {layer} is not among the replayed MoE layers {sorted(index)}")
    return index[layer]


JITTER = 0.25  # map_routing's default: the t+1 reuse at K=10 near Flash-MoE's 25.6% for the real 397B (module doc)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 (a fixed, well-spread hash)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _top(doc: Trace, layer: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [n, k] (best first) and renormalised weights [n, k] of the source router at `layer`."""
    if k <= doc.top_k:
        ids = doc.topk_ids[:, layer, :k].astype(np.int64)
        w = doc.topk_weights[:, layer, :k].astype(np.float64)
        if doc.router_logits is not None:  # the router's probabilities (the recorded weights may be renormalised)
            p = torch.softmax(torch.from_numpy(doc.router_logits[:, layer].astype(np.float32)), -1).double().numpy()
            w = np.take_along_axis(p, ids, axis=1)
    else:
        if doc.router_logits is None:
            raise ValueError(f"mapping top-{doc.top_k} onto top-{k} needs the source router's logits: record the "
                             f"trace with them (TraceRecorder(logits=True), `tiered trace` without --no-logits)")
        p = torch.softmax(torch.from_numpy(doc.router_logits[:, layer].astype(np.float32)), -1)
        wt, it = torch.topk(p, k, dim=-1)
        ids, w = it.numpy().astype(np.int64), wt.double().numpy()
    return ids, (w / np.maximum(w.sum(-1, keepdims=True), 1e-30)).astype(np.float32)


def _hash(*parts: np.ndarray) -> np.ndarray:
    """A well-spread uint64 hash of broadcastable integer arrays (wrapping arithmetic)."""
    mults = (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3)
    with np.errstate(over="ignore"):
        x = np.uint64(0x2545F4914F6CDD1D)
        for p, m in zip(parts, mults):
            x = x + np.asarray(p).astype(np.uint64) * np.uint64(m)
        return _mix(x)


def map_routing(trace: Trace, *, num_layers: int, num_experts: int, top_k: int, segment: int = 128,
                jitter: float = JITTER, seed: int = 0) -> Trace:
    """Map `trace` (L layers, E experts, top-K) onto num_layers x num_experts at top_k (see the module doc).

    num_experts must be a multiple of E; any num_layers; top_k <= E (above K it needs router logits).
    jitter: the share of expert uses whose group member is drawn per token instead of per segment (deterministic,
    by hash of (target layer, expert, token)); it lowers the t+1 reuse without changing which source experts are
    used. The member never depends on the rank, so the top-4 mapping is a subset of the top-10 one.
    """
    L, E = trace.num_layers, trace.num_experts
    if num_experts % E or num_experts < E:
        raise ValueError(f"cannot map {E} experts onto {num_experts}: the target's experts must be a multiple of the "
                         f"source's")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k {top_k} must be in 1..{E} (the source's experts)")
    if segment < 1 or not 0.0 <= jitter <= 1.0:
        raise ValueError(f"segment must be >= 1 token and jitter in [0, 1], got {segment} and {jitter}")
    G = num_experts // E
    S = -(-num_layers // L)  # streams
    docs = [trace.doc(d) for d in range(trace.num_docs)]
    ND = len(docs)
    ids_out, w_out, tok_out, offs = [], [], [], [0]
    for d in range(ND):
        streams = [docs[(d + s) % ND] for s in range(S)]
        n = min(x.num_tokens for x in streams)
        ids = np.empty((n, num_layers, top_k), dtype=np.int16)
        w = np.empty((n, num_layers, top_k), dtype=np.float32)
        t = np.arange(n, dtype=np.uint64)[:, None]  # [n, 1] position in the document
        for lt in range(num_layers):
            sid, sw = _top(streams[lt // L].doc(0, n), lt % L, top_k)
            h_seg = _hash(lt, sid, t // np.uint64(segment), seed, 1) % np.uint64(G)
            h_tok = _hash(lt, sid, t, seed, 2) % np.uint64(G)
            per_token = (_hash(lt, sid, t, seed, 3) >> np.uint64(11)).astype(np.float64) / float(1 << 53) < jitter
            ids[:, lt] = sid * G + np.where(per_token, h_tok, h_seg).astype(np.int64)
            w[:, lt] = sw
        ids_out.append(ids)
        w_out.append(w)
        tok_out.append(streams[0].tokens[:n])
        offs.append(offs[-1] + n)
    meta = {k: v for k, v in trace.meta.items() if k != "mapped_from"}
    return Trace(tokens=np.concatenate(tok_out), doc_offsets=np.asarray(offs, dtype=np.int64),
                 topk_ids=np.concatenate(ids_out), topk_weights=np.concatenate(w_out),
                 meta={**meta, "num_layers": num_layers, "num_experts": num_experts, "top_k": top_k,
                       "norm_topk_prob": True,
                       "mapped_from": {"num_layers": L, "num_experts": E, "top_k": trace.top_k, "group": G,
                                       "streams": S, "segment": segment, "jitter": jitter, "seed": seed,
                                       "rule": "map_routing"}})


def map_predictions(trace: Trace, gates: GateWeights, *, num_experts: int, count: int, segment: int = 128,
                    seed: int = 0) -> list[np.ndarray]:
    """Next-gate predictions of `trace` (recorded with hidden states) mapped as `map_routing(trace, num_layers=L,
    num_experts=num_experts, jitter=0)` maps its routing: per document, int64 [n, L, count], row (t, l) layer l's
    `count` likeliest experts predicted at token t from the hidden state after layer l-1's attention (predictors.
    NextGate: layer l's norm and router applied one layer early; `gates` a GateWeights of the source model), each
    source expert e put on the member of its group that map_routing gives a routed use of e at (l, t); layer 0
    (nothing earlier to predict from) is -1. A prefetch of these candidates replays the predictor a trained model
    of the target's shape would run on its own hidden states (benchmark mode, with the replayed routing).
    Same target layers as the source's only (one stream)."""
    L, E = trace.num_layers, trace.num_experts
    if trace.hidden is None:
        raise ValueError("next-gate predictions need the trace's hidden states (TraceRecorder(hidden=True))")
    if num_experts % E or num_experts < E or not 1 <= count <= E:
        raise ValueError(f"cannot map {E} experts onto {num_experts} with {count} candidates")
    G = num_experts // E
    out = []
    for d in range(trace.num_docs):
        doc = trace.doc(d)
        n = doc.num_tokens
        h = torch.from_numpy(doc.hidden.astype(np.float32))  # [n, L, D]
        pred = np.full((n, L, count), -1, dtype=np.int64)
        t = np.arange(n, dtype=np.uint64)[:, None]
        for l in range(1, L):
            sid = gates.logits(h[:, l - 1], l).topk(count, dim=-1).indices.numpy().astype(np.int64)  # [n, count]
            pred[:, l] = sid * G + (_hash(l, sid, t // np.uint64(segment), seed, 1) % np.uint64(G)).astype(np.int64)
        out.append(pred)
    return out


def uniform_routing(num_tokens: int, *, num_layers: int, num_experts: int, top_k: int, seed: int = 0) -> Trace:
    """One document of `num_tokens` rows, each layer K distinct experts drawn uniformly, weights 1/K."""
    g = torch.Generator().manual_seed(seed)
    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int16)
    for l in range(num_layers):
        ids[:, l] = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=-1).indices.numpy()
    w = np.full(ids.shape, 1.0 / top_k, dtype=np.float32)
    return Trace(tokens=np.zeros(num_tokens, dtype=np.int32), doc_offsets=np.array([0, num_tokens], dtype=np.int64),
                 topk_ids=ids, topk_weights=w,
                 meta={"num_layers": num_layers, "num_experts": num_experts, "top_k": top_k, "docs": ["uniform"],
                       "mapped_from": {"rule": "uniform_routing", "seed": seed}})


def routing_stats(trace: Trace, max_tokens: int | None = None) -> dict:
    """Per-layer statistics of a trace's routing, averaged over layers and documents: reuse at t+1 (share of a
    row's experts used by the previous token at the same layer) and the distinct experts a layer touches."""
    reuse, distinct = [], []
    for d in range(trace.num_docs):
        doc = trace.doc(d, max_tokens)
        ids = doc.topk_ids.astype(np.int64)
        n, L, K = ids.shape
        if n < 2:
            continue
        hot = doc.multi_hot()  # [n, L, E]
        prev = np.take_along_axis(hot[:-1], ids[1:], axis=2)  # [n-1, L, K]
        reuse.append(float(prev.mean()))
        distinct.append(float(hot.any(0).sum(-1).mean()))
    return {"reuse_t1": float(np.mean(reuse)) if reuse else None,
            "distinct_experts_per_layer": float(np.mean(distinct)) if distinct else None,
            "num_experts": trace.num_experts, "top_k": trace.top_k}
