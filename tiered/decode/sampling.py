"""Sampling: logits -> the next token id, greedy or with temperature / top-k / top-p and a seeded generator.

Owns: `Sampling` (the parameters), `check_sampling`, `sample` (one row), `sample_rows` (a step's rows at once, on
the logits' device: no copy to the host, no sync) and `argmax_into` (the greedy pick written into a device buffer,
which the one-token graph captures). Does not own: the generation loops (engine.py, decode/ahead.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


class SamplingError(ValueError):
    """Sampling parameters out of range; the message says which and what is allowed."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int | None = None  # None = nondeterministic


def check_sampling(p: Sampling) -> None:
    if p.temperature < 0 or not math.isfinite(p.temperature):
        raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {p.temperature}")
    if p.top_k < 0:
        raise SamplingError(f"top_k must be >= 0 (0 = off), got {p.top_k}")
    if not 0 < p.top_p <= 1:
        raise SamplingError(f"top_p must be in (0, 1], got {p.top_p}")


def sample(logits: Tensor, p: Sampling, gen: torch.Generator) -> Tensor:
    """logits [V] -> next token id [1] int64 on the logits' device (sample_rows over one row; greedy is argmax).
    gen: a generator on the logits' device (sampling draws its noise there: no copy of the logits to the host)."""
    if p.temperature == 0:
        return torch.argmax(logits).view(1)  # argmax_into picks the same token (the same op on the same logits)
    return sample_rows(logits[None], [p], [gen])


def sample_rows(logits: Tensor, params: list[Sampling], gens: list[torch.Generator | None]) -> Tensor:
    """logits [R, V] -> one token id a row, [R] int64 on the logits' device, with no host sync.

    A greedy row (temperature 0) takes the argmax. A sampled row scales its logits by 1 / temperature (fp32), keeps
    its top_k largest (0: all) and the smallest prefix of those, by descending probability, whose mass reaches
    top_p (always at least one token), and picks argmax(x + Gumbel noise) over what it kept: a draw from the
    softmax of the kept logits. The noise is V uniforms from the row's own generator (on the logits' device), so a
    seeded row draws the same tokens whatever the other rows of its step are.
    """
    R, V = logits.shape
    out = torch.argmax(logits, dim=-1)  # [R]: the greedy rows' picks (and a placeholder for the others)
    rows = [i for i, p in enumerate(params) if p.temperature != 0]
    if not rows:
        return out
    dev = logits.device
    idx = _on(dev, rows, torch.int64)
    ps = [params[i] for i in rows]
    temp = _on(dev, [p.temperature for p in ps], torch.float32)
    x = logits.index_select(0, idx).float() / temp[:, None]  # [S, V]
    ks = [p.top_k if 0 < p.top_k < V else V for p in ps]
    tp = [p.top_p for p in ps]
    if max(ks) < V:  # every row keeps at most kmax tokens: rank those only (topk sorts them), not the vocabulary
        sx, order = torch.topk(x, max(ks), dim=-1)  # [S, kmax], descending
        rank = torch.arange(sx.shape[1], device=dev)[None, :]
        sx = sx.masked_fill(rank >= _on(dev, ks, torch.int64)[:, None], float("-inf"))
    elif min(tp) < 1.0:
        if min(ks) < V:  # some rows' k-th largest value: everything below it goes
            x = _cut_top_k(x, ks)
        sx, order = torch.sort(x, dim=-1, descending=True)
    else:
        sx = order = None
        if min(ks) < V:
            x = _cut_top_k(x, ks)
    if sx is not None:
        if min(tp) < 1.0:
            probs = torch.softmax(sx, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
            drop = before >= _on(dev, tp, torch.float32)[:, None]
            sx = sx.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(1, order, sx)
    u = torch.stack([torch.rand(V, generator=gens[i], device=dev) for i in rows])  # [S, V] in [0, 1)
    gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
    return out.index_copy(0, idx, torch.argmax(x + gumbel, dim=-1))


def _cut_top_k(x: Tensor, ks: list[int]) -> Tensor:
    """x [S, V] with each row's values below its k-th largest set to -inf (k = V: the row is left whole)."""
    V = x.shape[1]
    kmax = max(k for k in ks if k < V)
    top = torch.topk(x, kmax, dim=-1).values  # [S, kmax]
    kth = top.gather(1, _on(x.device, [k - 1 if k < V else kmax - 1 for k in ks], torch.int64)[:, None])
    cut = _on(x.device, [k < V for k in ks], torch.bool)[:, None]
    return x.masked_fill(cut & (x < kth), float("-inf"))


def _on(dev: torch.device, values: list, dtype: torch.dtype) -> Tensor:
    """A small host list as a tensor on dev without waiting for the stream (torch.tensor(..., device=cuda) copies
    from pageable memory and synchronises: the batch scheduler samples right after launching a step)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else t


def argmax_into(logits: Tensor, token: Tensor) -> None:
    """The greedy next token of logits [1, V] written into token [1] int64 on the same device: no host sync and no
    shape that depends on the values, so a CUDA graph can capture it. The same pick as sample(logits[0], greedy)."""
    token.copy_(torch.argmax(logits[0]).view(1))
