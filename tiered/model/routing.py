"""Routing rules: router logits -> (top-k expert ids, their weights), one function per rule.

Owns: the rules (`softmax_topk`: softmax over all experts then top-k, optionally renormalised (Mixtral, Qwen,
OLMoE); `topk_softmax`: top-k on the logits then softmax over those k (gpt-oss)), `RULES` and `route_rule`,
which picks a model's rule from its ModelConfig. Does not own: the router's matrix (MoEWeights) nor what happens
to the ids afterwards: observers, predictors and traces see the final ids and weights, whatever the rule.

Legend: T tokens, E experts, K top-k.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tiered.layout.config import ModelConfig

Rule = Callable[[Tensor, int, bool], tuple[Tensor, Tensor]]  # (logits [T, E], K, norm) -> ids, weights fp32


def softmax_topk(logits: Tensor, top_k: int, norm_topk: bool) -> tuple[Tensor, Tensor]:
    """Softmax in fp32 over the E experts, then the K largest; renormalised to sum 1 when `norm_topk`."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w


def topk_softmax(logits: Tensor, top_k: int, norm_topk: bool) -> tuple[Tensor, Tensor]:
    """The K largest logits, then softmax over those K in the logits' dtype (gpt-oss); the weights sum to 1."""
    v, ids = torch.topk(logits, top_k, dim=-1)
    return ids, torch.softmax(v, dim=-1, dtype=v.dtype).float()


RULES: dict[str, Rule] = {"softmax_topk": softmax_topk, "topk_softmax": topk_softmax}


def route_rule(config: ModelConfig) -> Rule:
    """The rule a model routes by (ModelConfig.extra["router"], default softmax_topk)."""
    name = config.extra.get("router", "softmax_topk")
    if name not in RULES:
        raise ValueError(f"family {config.family}: routing rule {name!r} is not implemented; rules are {sorted(RULES)}")
    return RULES[name]
