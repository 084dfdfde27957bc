"""Plain-torch references of the MoE kernels, with the same signatures: the loop over experts.

Owns: `expert_matrices` (one slot's gate/up/down as float matrices: the dequantization reference that
the quantized formats will extend), `experts_loop` (the reference of moe_decode.moe_decode and
moe_grouped.moe_grouped: a loop over tokens and their K experts) and `align_reference` (the row
order the grouped kernel's alignment must produce, computed with Python lists).
Does not own: the kernels (moe_decode.py, moe_grouped.py), the model's own torch paths (model/moe.py).

Rounding follows model/moe.py: each expert's output in the compute dtype, times its routing weight,
summed over K in fp32 with one rounding at the end.

Legend: T tokens, D hidden, K top-k, F expert FFN, E experts per layer, S slots in the pool.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.kernels.moe_operands import ExpertOperands, check_built


def expert_matrices(ops: ExpertOperands, slot: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Slot `slot`'s (gate [F, D], up [F, D], down [D, F]) in `dtype`."""
    check_built(ops)
    return ops.gate[slot].to(dtype), ops.up[slot].to(dtype), ops.down[slot].to(dtype)


def experts_loop(x: Tensor, slots: Tensor, weights: Tensor, ops: ExpertOperands, act=None) -> Tensor:
    """x [T, D], slots [T, K] int64 rows of the pool, weights [T, K] -> [T, D] in x's dtype. act: None (SwiGLU)
    or gpt-oss's ClampedSwiGLU (model/moe.py); the operands' biases, where they carry them, are added (gate and up
    before the activation, down to the expert's output)."""
    ops = ExpertOperands.of(ops, act)
    T, K = slots.shape
    dt = x.dtype
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for t in range(T):
        for k in range(K):
            s = int(slots[t, k])
            g, u, d = expert_matrices(ops, s, dt)
            xt = x[t:t + 1]
            b = (ops.gate_bias[s].to(dt), ops.up_bias[s].to(dt), ops.down_bias[s].to(dt)) if ops.has_bias \
                else (None, None, None)
            gx, ux = F.linear(xt, g, b[0]), F.linear(xt, u, b[1])
            if ops.act == 0:
                h = F.silu(gx) * ux
            else:
                gc = gx.clamp(max=ops.limit)
                h = (ux.clamp(-ops.limit, ops.limit) + 1) * (gc * torch.sigmoid(gc * ops.alpha))
            y = F.linear(h, d, b[2])  # [1, D] compute dtype
            out[t] += y[0].float() * weights[t, k].float()
    return out.to(dt)


def align_reference(ids: Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """The grouped kernel's row order: (sorted rows, expert per block) for ids [T, K] in [0, E).

    Rows are t*K + k, grouped by expert in ascending order, in (t, k) order inside an expert; each
    expert's group is padded with the sentinel T*K to a multiple of block_m. Experts with no rows
    get no block. (The kernel's buffers are longer: their tail holds sentinels and expert -1.)
    """
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    rows, experts = [], []
    for e in range(num_experts):
        mine = [i for i, v in enumerate(flat) if v == e]
        if not mine:
            continue
        nb = -(-len(mine) // block_m)
        rows += mine + [n] * (nb * block_m - len(mine))
        experts += [e] * nb
    return rows, experts
