"""Routing rules: router logits -> (top-k expert ids, their weights), one function per rule.

Owns: the rules (`softmax_topk`: softmax over all experts then top-k, optionally renormalised (Mixtral, Qwen,
OLMoE); `topk_softmax`: top-k on the logits then softmax over those k (gpt-oss); `sigmoid_groups`: sigmoid scores, a
per-expert correction bias for the choice only, group-limited top-k, scaled weights (DeepSeek-V3)), `RULES` and
`route_rule`,
which picks a model's rule from its ModelConfig. Does not own: the router's matrix (MoEWeights) nor what happens
to the ids afterwards: observers, predictors and traces see the final ids and weights, whatever the rule.

Legend: T tokens, E experts, K top-k.
"""
from __future__ import annotations

from functools import partial
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


def sigmoid_groups(logits: Tensor, top_k: int, norm_topk: bool, *, score_bias: Tensor, n_group: int,
                   topk_group: int, scale: float) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: scores = sigmoid(logits) (fp32); the choice adds `score_bias` [E] to them, keeps the
    `topk_group` groups (of E / n_group experts) whose two best biased scores sum highest, and takes the top-k
    there; the weights are the unbiased scores of the chosen experts, renormalised when `norm_topk`, times
    `scale` (routed_scaling_factor)."""
    T, E = logits.shape
    scores = logits.float().sigmoid()
    choice = scores + score_bias.float()
    groups = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)  # [T, n_group]
    keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, topk_group, dim=-1)[1], 1.0).bool()
    choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1)[1]
    w = scores.gather(1, ids)
    if norm_topk:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids, w * scale


RULES: dict[str, Rule] = {"softmax_topk": softmax_topk, "topk_softmax": topk_softmax, "sigmoid_groups": sigmoid_groups}


def layer_rule(config: ModelConfig, score_bias: Tensor | None) -> Rule:
    """One layer's rule as a Rule: sigmoid_groups bound to the layer's correction bias and the config's groups
    and scale (DeepSeek-V3), else the model's rule."""
    rule = route_rule(config)
    if rule is not sigmoid_groups:
        return rule
    if score_bias is None:
        raise ValueError(f"family {config.family}: the sigmoid_groups router needs each MoE layer's "
                         "router_score_bias (e_score_correction_bias); the layout has none")
    x = config.extra
    return partial(sigmoid_groups, score_bias=score_bias, n_group=int(x.get("n_group", 1)),
                   topk_group=int(x.get("topk_group", 1)), scale=float(x.get("routed_scaling_factor", 1.0)))


def route_rule(config: ModelConfig) -> Rule:
    """The rule a model routes by (ModelConfig.extra["router"], default softmax_topk)."""
    name = config.extra.get("router", "softmax_topk")
    if name not in RULES:
        raise ValueError(f"family {config.family}: routing rule {name!r} is not implemented; rules are {sorted(RULES)}")
    return RULES[name]
