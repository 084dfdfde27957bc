"""Routing rules of the MoE families, one function per rule, and the gpt-oss activation.

Owns: the rules that turn router logits into (ids, weights): `softmax_topk` (Mixtral, Qwen, OLMoE: softmax over
all experts, top-k, optional renormalisation), `topk_softmax` (gpt-oss: top-k on the logits, softmax over the
k), `sigmoid_grouped_topk` (DeepSeek-V3: sigmoid scores, a per-expert correction bias that only steers the choice,
group-limited top-k, renormalisation and a routed scaling factor); and `clamped_swiglu` (gpt-oss's expert
activation). Every rule returns what predictors and traces see: the final ids and weights.
Does not own: the router matmul's weights, the expert compute (moe.py), which family uses which rule (config).

The math follows transformers' routers (`DeepseekV3TopkRouter`, `GptOssTopKRouter`) and `GptOssExperts`.

Legend: T tokens, E experts, K top-k, G expert groups.
"""
from __future__ import annotations

import torch
from torch import Tensor


def softmax_topk(logits: Tensor, top_k: int, norm_topk: bool) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> ids [T, K] int64, weights [T, K] fp32: softmax in fp32, top-k, optional renormalisation."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w


def topk_softmax(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """gpt-oss: logits [T, E] (router bias already added) -> ids [T, K], weights [T, K] in the logits' dtype:
    top-k on the logits, then a softmax over those k only."""
    top, ids = torch.topk(logits, top_k, dim=-1)
    return ids, torch.softmax(top, dim=-1, dtype=top.dtype)


def sigmoid_grouped_topk(logits: Tensor, bias: Tensor, top_k: int, *, n_group: int, topk_group: int,
                         norm_topk: bool, scaling: float) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3: logits [T, E] (fp32), e_score_correction_bias [E] -> ids [T, K], weights [T, K] fp32.

    Scores are sigmoid(logits). The choice uses score + bias: each of G groups is ranked by the sum of its two
    best biased scores, only the best `topk_group` groups stay eligible, and the top-k eligible experts are
    taken. The weights are the unbiased scores of those experts, renormalised (norm_topk) and times `scaling`.
    """
    T, E = logits.shape
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    groups = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
    keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, topk_group, dim=-1, sorted=False)[1], 1.0)
    eligible = keep.bool()[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)
    ids = torch.topk(choice.masked_fill(~eligible, float("-inf")), top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if norm_topk:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * scaling


def clamped_swiglu(gate: Tensor, up: Tensor, *, limit: float = 7.0, alpha: float = 1.702) -> Tensor:
    """gpt-oss's expert activation: gate clamped above at `limit`, up to [-limit, limit], then
    gate * sigmoid(alpha * gate) * (up + 1). (gpt-oss stores gate and up interleaved: gate = gate_up[..., ::2].)"""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1)
