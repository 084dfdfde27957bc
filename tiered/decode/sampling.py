"""Sampling: logits -> the next token id, greedy or with temperature / top-k / top-p and a seeded generator.

Owns: `Sampling` (the parameters), `check_sampling`, `sample` and `argmax_into` (the greedy pick written into a
device buffer, which the one-token graph captures). Does not own: the generation loops (engine.py, decode/ahead.py).
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
    """logits [V] -> next token id [1] int64. Greedy stays on the logits' device; sampling runs on CPU in fp32."""
    if p.temperature == 0:
        return torch.argmax(logits).view(1)  # argmax_into picks the same token (the same op on the same logits)
    x = logits.float().cpu() / p.temperature  # [V]
    if p.top_k > 0 and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sx, order = torch.sort(x, descending=True)
        probs = torch.softmax(sx, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
        drop = before >= p.top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        x = x.scatter(0, order[drop], float("-inf"))
    return torch.multinomial(torch.softmax(x, dim=-1), 1, generator=gen)


def argmax_into(logits: Tensor, token: Tensor) -> None:
    """The greedy next token of logits [1, V] written into token [1] int64 on the same device: no host sync and no
    shape that depends on the values, so a CUDA graph can capture it. The same pick as sample(logits[0], greedy)."""
    token.copy_(torch.argmax(logits[0]).view(1))
