"""Grouped expert GEMMs for one decode token on CUDA: read each chosen expert's weights once, no gather copy.

Owns: `experts_decode_grouped`, which computes K experts for one token with
`torch.nn.functional.grouped_mm` (or `torch._grouped_mm`) straight over a pool of expert blocks,
grouping by slot. `index_select` of the K experts' weights copies them first (read + write of
every weight byte, then read again by the matmul); a grouped GEMM reads each once.
Does not own: which slots hold which experts (the provider), the prefill path (moe.experts_grouped).

Legend: S slots in the pool, K top-k, D hidden, F expert FFN.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _grouped_mm():
    fn = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def experts_decode_grouped(x: Tensor, slots: Tensor, weights: Tensor, gate: Tensor, up: Tensor,
                           down: Tensor) -> Tensor:
    """x [1, D] (bf16/fp16), slots [K] int64 distinct rows of the pool, weights [1, K] -> [1, D].

    gate, up [S, F, D] and down [S, D, F] are views over the pool (any row stride). No host sync:
    graph-capturable (histc, not bincount, sizes the groups).
    """
    gmm = _grouped_mm()
    S = gate.shape[0]
    K = slots.shape[0]
    order = torch.argsort(slots)  # [K] groups must be in ascending slot order
    sorted_slots = slots.index_select(0, order)
    # histc takes ints on CUDA (exact) and floats on CPU (exact below 2**24 slots)
    counts = torch.histc(sorted_slots.to(torch.int32 if slots.is_cuda else torch.float32), bins=S, min=0, max=S - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [S]
    xs = x.expand(K, x.shape[1]).contiguous()  # [K, D]
    g = gmm(xs, gate.transpose(1, 2), offs=offs)  # [K, F]
    u = gmm(xs, up.transpose(1, 2), offs=offs)  # [K, F]
    h = torch.nn.functional.silu(g) * u  # [K, F]
    y = gmm(h, down.transpose(1, 2), offs=offs)  # [K, D]
    w = weights.view(K).index_select(0, order).to(y.dtype)  # [K]
    return (y * w[:, None]).sum(0, keepdim=True)  # [1, D]
