"""The softmax-then-top-k routing rule (Mixtral, Qwen, OLMoE) in one Triton launch per call.

Owns: `softmax_topk(logits, top_k, norm_topk)` -> (ids [T, K] int64, weights [T, K] fp32), the same contract as
model/routing.py's `softmax_topk` (the torch reference, which the CPU path keeps and the tests compare with).
Does not own: the router's GEMV (logits come in), the other rules (gpt-oss's top-k-then-softmax and DeepSeek's
grouped sigmoid stay on torch: model/routing.py), nor what happens to the ids afterwards.

One program per token: the E logits in registers, softmax in fp32 (max subtracted, exp, divided by the sum), then
K rounds of arg-max, each taking the largest remaining probability and, among equal ones, the LOWEST expert id;
with norm_topk the K weights are divided by their fp32 sum.
Ties: torch.topk on CUDA selects every value above the K-th largest and fills the rest with the lowest-index
elements equal to it (TensorTopK.cu's gatherTopK), so the chosen SET of experts is the same as here; it then
sorts the K values with an in-place sort that does not promise an order among equal values, while this kernel
orders equal weights by ascending id. Equal probabilities come from equal logits (bf16 logits tie often among
128 experts); a different order of equal weights changes the MoE sum only by fp32 summation order.
Exponentials: Triton's exp (ex2-based on CUDA) is not torch's expf, so weights may differ in their last fp32 bits;
a choice can flip only where two logits differ by less than that, i.e. practically never for bf16 logits.

Legend: T tokens, E experts, K top-k.
"""
from __future__ import annotations

import torch
from torch import Tensor

from tiered.kernels.fused_norm import _check_device, _warps, triton, tl
from tiered.kernels.pdl import gdc_enter, launch_args


def softmax_topk(logits: Tensor, top_k: int, norm_topk: bool) -> tuple[Tensor, Tensor]:
    """logits [T, E] (any float dtype) -> ids [T, K] int64, weights [T, K] fp32 (routing.softmax_topk's contract)."""
    _check_device(logits, "softmax_topk")
    if logits.dim() != 2:
        raise ValueError(f"softmax_topk wants logits [T, E], got {tuple(logits.shape)}")
    T, E = logits.shape
    K = int(top_k)
    if not 0 < K <= E:
        raise ValueError(f"softmax_topk: top_k={K} with {E} experts")
    lg = logits if logits.stride(-1) == 1 else logits.contiguous()
    ids = torch.empty((T, K), dtype=torch.int64, device=logits.device)
    w = torch.empty((T, K), dtype=torch.float32, device=logits.device)
    if T == 0:
        return ids, w
    block = triton.next_power_of_2(E)
    _SOFTMAX_TOPK[(T,)](lg, ids, w, E, lg.stride(0), K=K, K_P=triton.next_power_of_2(K), BLOCK_E=block,
                        NORM=bool(norm_topk), num_warps=_warps(block),
                        **launch_args(logits.device))
    return ids, w


def _softmax_topk_kernel(LOGITS, IDS, W, E, s_l, K: tl.constexpr, K_P: tl.constexpr, BLOCK_E: tl.constexpr,
                         NORM: tl.constexpr, GDC: tl.constexpr = False):
    gdc_enter(GDC)
    t = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK_E)
    m = o < E
    x = tl.load(LOGITS + t * s_l + o, mask=m, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))  # padding: exp(-inf) = 0
    p = e / tl.sum(e, axis=0)
    p = tl.where(m, p, -1.0)  # padding is never chosen
    ko = tl.arange(0, K_P)
    vals = tl.zeros([K_P], dtype=tl.float32)
    idx = tl.zeros([K_P], dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.max(p, axis=0)
        i = tl.min(tl.where(p == best, o, BLOCK_E), axis=0)  # the lowest id among equal probabilities
        vals = tl.where(ko == k, best, vals)
        idx = tl.where(ko == k, i, idx)
        p = tl.where(o == i, -2.0, p)
    if NORM:
        vals = vals / tl.sum(vals, axis=0)  # entries past K are 0
    km = ko < K
    tl.store(IDS + t * K + ko, idx.to(tl.int64), mask=km)
    tl.store(W + t * K + ko, vals, mask=km)


_SOFTMAX_TOPK = None
if triton is not None:
    _SOFTMAX_TOPK = triton.jit(_softmax_topk_kernel)
