"""The CUDA expert paths of model/moe.py: the Triton MoE kernels over a provider's pool.

Owns: `kernels_enabled` (whether a model on this device uses the kernels), `experts_decode` (few tokens:
the fused decode kernel over known slot rows, graph-capturable) and `experts_grouped_kernel` (prefill and
batches: rows grouped by expert, the provider's experts in waves of `max_experts_per_call`, one grouped
launch per projection per wave).
Does not own: the kernels (tiered/kernels), the plain torch paths (model/moe.py, which CPU keeps), where
experts live (the provider).

Legend: T tokens, D hidden, K top-k, E experts per layer.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tiered.kernels import triton_available

# One token per decode kernel call; several tokens (prefill, batches) take the grouped kernel, which reads
# an expert once for all its rows (bench_moe_kernels.py compares the two at T = 2..8).
DECODE_MAX_T = 1


def kernels_enabled(device: torch.device | str) -> bool:
    """True on CUDA with Triton installed; CPU keeps the plain torch path."""
    return triton_available(device)


def experts_decode(x: Tensor, slots: Tensor, weights: Tensor, W: Any) -> Tensor:
    """x [T, D], slots [T, K] (or [K]) slot rows of W on x's device, weights [T, K] -> [T, D] (no host sync)."""
    from tiered.kernels.moe_decode import moe_decode

    return moe_decode(x, slots, weights, W)


def experts_grouped_kernel(x: Tensor, ids: Tensor, weights: Tensor, provider: Any, layer: int,
                           num_experts: int) -> Tensor:
    """x [T, D], ids [T, K] experts, weights [T, K] -> [T, D], experts from `provider` in waves.

    A provider with `holds_all = True` (every expert resident; slots need no loading) is asked for all
    E experts at once: no host sync, graph-capturable. Otherwise the distinct experts are read back to
    the host (the provider must know what to load) and served in waves; each wave's kernels are enqueued
    before the next get(), as the torch loop does.
    """
    from tiered.kernels.moe_grouped import GroupedMoE

    run = GroupedMoE(x, ids, weights, num_experts)
    W = provider.weights
    if getattr(provider, "holds_all", False):
        run.wave(W, provider.get(layer, torch.arange(num_experts, device=x.device)))
        return run.result()
    used = torch.unique(ids.reshape(-1))  # sorted distinct experts (one host sync)
    n = max(1, int(provider.max_experts_per_call))
    U = used.numel()
    for w0 in range(0, U, n):
        part = used[w0:w0 + n]
        slots = provider.get(layer, part)  # the wave's slots, pinned until the next get()
        if w0 + n < U:
            provider.prefetch(layer, used[w0 + n:w0 + 2 * n])
        slot_map = torch.full((num_experts,), -1, dtype=torch.int64, device=x.device)
        slot_map.index_copy_(0, part.to(x.device), slots.to(device=x.device, dtype=torch.int64))
        run.wave(W, slot_map)
    return run.result()
