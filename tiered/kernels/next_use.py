"""The device step's next-use update as one kernel: a layer's routed ids -> new eviction and prefetch scores.

Owns `next_use_update` (one Triton program per call, CUDA) and the numbers it computes, which are those of the torch
path of decode/devpolicy.NextUse.update (the reference it is tested against; the model is documented there): the
EWMAs of layer j, the predicted missed visits of layer j's experts (time model) and of layer j+1's (layer model),
as p = 1 / (1 + w) and as each key's scaled base M * w, the prefetch probability of layer j+1, layer j's ids
kept for the next token, and the next resolve's nt (dist + base over every key: no launch of its own). Written as
one kernel because in torch the update is about forty small kernels per layer, which inside a CUDA graph cost more
than the misses the policy saves.
Does not own: the state tensors (NextUse allocates them), nor the slot table.

Legend: M MoE layers, E experts, K top-k, N keys.
Tensors: ids int64 [K]; prev int64 [M, K] (each layer's ids at its last visit, -1 = none); tt fp32 [M, E, E], lt fp32
[M-1, E, E] (rows: from expert, columns: to expert); fast, slow, prob, pf_prob fp32 [M, E]; base int64 [N]; w fp32 [15]
(w_time 4, b_time, w_layer 4, b_layer, w_prefetch 4, b_prefetch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tiered.kernels.pdl import gdc_enter, launch_args


@triton.jit
def _feature_rows(mat, rows, mk, oe, me, E):
    """sum over the valid rows r of mat[r, :] -> [E_P] (mat: one [E, E] matrix)."""
    ptr = mat + rows[:, None] * E + oe[None, :]
    return tl.sum(tl.load(ptr, mask=mk[:, None] & me[None, :], other=0.0), axis=0)


@triton.jit
def _p_and_base(z, p_min, M, scale):
    """z = predicted log(1 + missed visits) -> (p = 1 / (1 + w) clamped, round(M * (1 - p) / p * scale))."""
    p = tl.exp(-z)
    p = tl.minimum(tl.maximum(p, p_min), 1.0 - 1e-6)
    b = tl.floor(M * (1.0 - p) / p * scale + 0.5)
    return p, b.to(tl.int64)


@triton.jit
def _next_use_kernel(ids_ptr, prev_ptr, tt_ptr, lt_ptr, fast_ptr, slow_ptr, prob_ptr, pfp_ptr, base_ptr, w_ptr,
                     nt_ptr, dist_ptr, n_keys, j, key_j, key_j1, n_ids, E, M, fa, sa, eps, p_min, scale,
                     HAS_NEXT: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr, BLOCK_N: tl.constexpr,
                     GDC: tl.constexpr = False):
    gdc_enter(GDC)
    oe = tl.arange(0, E_P)
    me = oe < E
    ok = tl.arange(0, K_P)
    mk = ok < n_ids
    ids = tl.load(ids_ptr + ok, mask=mk, other=-1)
    oh = tl.sum(tl.where((ids[:, None] == oe[None, :]) & mk[:, None], 1.0, 0.0), axis=0)  # [E_P] used now
    row = j * E + oe
    f = tl.load(fast_ptr + row, mask=me, other=0.0) * fa + (1.0 - fa) * oh
    s = tl.load(slow_ptr + row, mask=me, other=0.0) * sa + (1.0 - sa) * oh
    tl.store(fast_ptr + row, f, mask=me)
    tl.store(slow_ptr + row, s, mask=me)
    tsum = _feature_rows(tt_ptr + j * E * E, ids, mk, oe, me, E)
    z = (tl.load(w_ptr + 0) * tl.log(tsum + eps) + tl.load(w_ptr + 1) * tl.log(f + eps)
         + tl.load(w_ptr + 2) * tl.log(s + eps) + tl.load(w_ptr + 3) * tl.log(oh + eps) + tl.load(w_ptr + 4))
    p, b = _p_and_base(z, p_min, M, scale)
    tl.store(prob_ptr + row, p, mask=me)
    tl.store(base_ptr + key_j + oe, b, mask=me)
    if HAS_NEXT:
        row1 = (j + 1) * E + oe
        lsum = _feature_rows(lt_ptr + j * E * E, ids, mk, oe, me, E)
        pids = tl.load(prev_ptr + (j + 1) * n_ids + ok, mask=mk, other=-1)
        tprev = _feature_rows(tt_ptr + (j + 1) * E * E, pids, mk & (pids >= 0), oe, me, E)
        f1 = tl.load(fast_ptr + row1, mask=me, other=0.0)
        s1 = tl.load(slow_ptr + row1, mask=me, other=0.0)
        x0 = tl.log(lsum + eps)
        x1 = tl.log(tprev + eps)
        x2 = tl.log(f1 + eps)
        x3 = tl.log(s1 + eps)
        z1 = (tl.load(w_ptr + 5) * x0 + tl.load(w_ptr + 6) * x1 + tl.load(w_ptr + 7) * x2 + tl.load(w_ptr + 8) * x3
              + tl.load(w_ptr + 9))
        p1, b1 = _p_and_base(z1, p_min, M, scale)
        tl.store(prob_ptr + row1, p1, mask=me)
        tl.store(base_ptr + key_j1 + oe, b1, mask=me)
        zp = (tl.load(w_ptr + 10) * x0 + tl.load(w_ptr + 11) * x1 + tl.load(w_ptr + 12) * x2
              + tl.load(w_ptr + 13) * x3 + tl.load(w_ptr + 14))
        tl.store(pfp_ptr + row1, 1.0 / (1.0 + tl.exp(-zp)), mask=me)
    tl.store(prev_ptr + j * n_ids + ok, ids, mask=mk)
    # nt for the next resolve, dist + base over every key: after a barrier, so the bases stored above (by other
    # threads of this program) are what the loads below read
    tl.debug_barrier()
    for n0 in range(0, n_keys, BLOCK_N):
        on = n0 + tl.arange(0, BLOCK_N)
        mn = on < n_keys
        tl.store(nt_ptr + on, tl.load(dist_ptr + on, mask=mn, other=0) + tl.load(base_ptr + on, mask=mn, other=0),
                 mask=mn)


def _p2(n: int) -> int:
    return max(2, triton.next_power_of_2(int(n)))


def next_use_update(ids: Tensor, j: int, key_j: int, key_j1: int, *, prev: Tensor, tt: Tensor, lt: Tensor,
                    fast: Tensor, slow: Tensor, prob: Tensor, pf_prob: Tensor, base: Tensor, w: Tensor,
                    decay: tuple[float, float], eps: float, p_min: float, scale: int, nt: Tensor,
                    dist: Tensor) -> None:
    """Layer j's update (module doc), in place; key_j / key_j1 = the first key of MoE layers j / j+1 (model layer *
    E; key_j1 unused for the last layer). Then nt [N] = dist [N] + base, the next resolve's (dist: its layer's row
    of NextUse.dist)."""
    M, E = fast.shape
    K = ids.shape[0]
    N = base.shape[0]
    if nt.shape != (N,) or dist.shape != (N,) or nt.dtype != torch.int64 or not dist.is_contiguous():
        raise ValueError(f"next_use_update: nt and dist must be contiguous int64 [{N}] (one per key), got "
                         f"{nt.dtype} {tuple(nt.shape)} and {dist.dtype} {tuple(dist.shape)}")
    nxt = j + 1 < M
    _next_use_kernel[(1,)](ids, prev, tt, lt if lt.numel() else tt, fast, slow, prob, pf_prob, base, w, nt, dist, N,
                           j, key_j, key_j1 if nxt else 0, K, E, M, float(decay[0]), float(decay[1]), float(eps),
                           float(p_min), float(scale), HAS_NEXT=nxt, K_P=_p2(K), E_P=_p2(E),
                           BLOCK_N=min(1024, _p2(N)), num_warps=4 if E <= 256 else 8, **launch_args(ids.device))
