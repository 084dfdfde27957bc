"""transformers' routing decisions, captured and replayed into tiered (GPU correctness benchmarks, tests).

Random-weight MoE models with many experts put near-ties between the k-th and (k+1)-th router scores of most
tokens, so a bf16 rounding difference anywhere upstream flips some experts, and every flip moves that token's
output by a whole expert's share. Two correct bf16 implementations then differ by far more than their rounding
(on the 35B-A3B shape: ~0.17 relative on logits, both transformers and tiered against fp32). To judge the
arithmetic apart from those discrete flips, `capture` records transformers' own top-k ids and weights per layer
and `Replay` makes tiered route exactly like it (a RoutingOverride, tiered.model.transformer).

Owns: `capture(hf_model, input_ids)` and `Replay`. Does not own: building either model.
Legend: T tokens, K top-k, L layers.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _gate(layer):
    """The router module of one transformers decoder layer, or None for a dense layer."""
    mlp = getattr(layer, "mlp", None)
    for name in ("gate", "router"):
        g = getattr(mlp, name, None)
        if g is not None and hasattr(g, "weight"):
            return g
    return None


def _ids_weights(out, top_k: int) -> tuple[Tensor, Tensor]:
    """(ids [T, K] int64, weights [T, K] fp32) from a transformers router's outputs, whatever their order:
    the integer tensor is the ids, the floating [T, K] one the weights."""
    outs = out if isinstance(out, tuple) else (out,)
    ids = next(o for o in outs if isinstance(o, Tensor) and not o.is_floating_point())
    w = [o for o in outs if isinstance(o, Tensor) and o.is_floating_point() and o.shape == ids.shape]
    if not w:  # routers that return full scores [T, E] (gpt-oss): weights are the scores at the ids
        full = next(o for o in outs if isinstance(o, Tensor) and o.is_floating_point() and o.shape[-1] > top_k)
        w = [full.gather(-1, ids)]
    return ids.reshape(-1, ids.shape[-1]).long(), w[0].reshape(-1, ids.shape[-1]).float()


def _record(routes: dict, l: int, out, top_k: int) -> None:
    """Store layer l's (ids, weights); a router whose outputs carry no ids leaves the layer out (no replay)."""
    try:
        routes[l] = _ids_weights(out, top_k)
    except StopIteration:
        pass


def capture(hf_model, input_ids: Tensor, top_k: int) -> tuple[Tensor, dict[int, tuple[Tensor, Tensor]]]:
    """Run transformers' model on input_ids [T] (one sequence) -> (logits [T, V] fp32, {layer: (ids, weights)}),
    the routing of every MoE layer as transformers chose it."""
    routes: dict[int, tuple[Tensor, Tensor]] = {}
    hooks = []
    for l, layer in enumerate(hf_model.model.layers):
        g = _gate(layer)
        if g is not None:
            hooks.append(g.register_forward_hook(lambda m, i, o, l=l: _record(routes, l, o, top_k)))
    try:
        with torch.no_grad():
            logits = hf_model(input_ids[None]).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    return logits, routes


class Replay:
    """A tiered RoutingOverride returning captured routing for positions start..start+T-1 of one sequence."""

    def __init__(self, routes: dict[int, tuple[Tensor, Tensor]], device: torch.device | str) -> None:
        self.routes = {l: (i.to(device), w.to(device)) for l, (i, w) in routes.items()}
        self.host_routes = {l: (i.cpu(), w.cpu()) for l, (i, w) in routes.items()}

    def __call__(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]:
        ids, w = self.routes[layer]
        return ids[start:start + T], w[start:start + T]

    def host(self, layer: int, start: int, T: int) -> tuple[Tensor, Tensor]:
        ids, w = self.host_routes[layer]
        return ids[start:start + T], w[start:start + T]


def flips(a: dict[int, tuple[Tensor, Tensor]], b: dict[int, tuple[Tensor, Tensor]]) -> float:
    """Share of (token, layer) top-k sets that differ between two captured routings."""
    diff = total = 0
    for l in a:
        x, y = a[l][0].sort(-1).values.cpu(), b[l][0].sort(-1).values.cpu()
        diff += int((x != y).any(-1).sum())
        total += x.shape[0]
    return diff / max(total, 1)
