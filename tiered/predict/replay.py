"""Replayed routing: make a random-weight model route like a recorded trace (benchmark mode).

Random weights route almost uniformly, so no cache policy or predictor can be judged on them. For
bandwidth benchmarks on a large random model, the router's choice is replaced by a recorded trace of
the trained reference model, mapped onto the large model's layers and experts.

Owns: `map_trace` (the documented, deterministic mapping) and `ReplayRouting` (the override the
model calls instead of its router). Does not own: recording traces (trace.py) or the model.

The mapping (no lookahead: token t of the mapped trace is made only from token t of the source):
    source: L layers, E experts, top-K;   target: L' = H*L layers, E' = H*E experts, the same K,
    where H = L'/L (the 10.6B Qwen3-MoE shape from olmoe-code-17m: H = 2).
    target layer l' = h*L + l  (h = l' // L, l = l' % L) takes source layer l of source stream h;
    target expert   e' = H*e + h.
    Stream h is the source trace shifted by h documents (document d of stream h is source document
    (d + h) mod ND), truncated to the shortest, so the two halves of the model see different text and
    each target layer uses E of its E' experts with the source layer's reuse and co-occurrence
    structure. Routing weights are copied with the ids.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from tiered.predict.trace import Trace


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
    source model chose at position p.
    """

    def __init__(self, topk_ids: np.ndarray, topk_weights: np.ndarray, *, device: torch.device | str) -> None:
        self.ids_host = torch.as_tensor(topk_ids.astype(np.int64))  # [N, L, K] (the host reads rows without a sync)
        self.weights_host = torch.as_tensor(topk_weights, dtype=torch.float32)  # [N, L, K]
        self.ids = self.ids_host.to(device)
        self.weights = self.weights_host.to(device)

    def __call__(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]:
        """ids [T, K] int64 and weights [T, K] fp32 of layer `layer` for positions start..start+T-1 (on the device)."""
        self._check(start, T)
        return self.ids[start:start + T, layer], self.weights[start:start + T, layer]

    def host(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]:
        """The same rows as __call__, on the host (CPU tensors: no device sync to read them)."""
        self._check(start, T)
        return self.ids_host[start:start + T, layer], self.weights_host[start:start + T, layer]

    def _check(self, start: int, T: int) -> None:
        if start + T > self.ids.shape[0]:
            raise IndexError(f"replayed routing has {self.ids.shape[0]} positions; position {start + T - 1} asked "
                             f"for: use a longer trace or fewer tokens")

