"""Prompt attention with sinks (gpt-oss) on PyTorch's bundled flash-attention kernel, corrected for the sink.

Owns: `sink_scale` (the exact correction of a sink-free softmax's output by its log-sum-exp), `flash_sinks` (causal,
optionally windowed and variable-length attention through `torch.ops.aten._flash_attention_forward`, then the
correction; `unpad_lse` for flash builds that pad the varlen log-sum-exp per sequence), `usable` (whether that path
serves a call here) and `MODES` / `mode` (TIERED_SINK_ATTN: "auto" or
"naive", the plain-matmul path kept as the reference and for benchmarks' comparisons).
Does not own: the plain path (layers.sinks_attend), the caches or the plans (layers.py, decode/batchstep.py).

Why. A sink adds exp(sink_h) to head h's softmax denominator and nothing to its numerator. layers.sinks_attend
materialises the scores ([heads, T, S] in the compute dtype, a masked copy, the sink column appended, max, softmax):
about 20 ms of a batch step's 39 ms for 32 prompts of 64 tokens on the gpt-oss-20b widths (session 32, call A).
Flash attention never writes the scores, and returns each row's log-sum-exp L = log(sum_s exp(score_s)), so

    o_sink = sum_s exp(score_s) v_s / (exp(L) + exp(sink)) = o * exp(L) / (exp(L) + exp(sink)) = o * sigmoid(L - sink)

exactly (in fp32, before the output's rounding). Rows are causal, bottom-right aligned (query t of Tq sits at key
position Tk - Tq + t, the flash convention: a chunk after a prefix), and with a window W a query at p sees keys
s > p - W (transformers' rule; flash's window_size_left = W - 1). Variable-length calls (cu_seqlens) attend each
sequence within itself: the batch step's fresh prompts, with no [n, n] mask.

Legend: Tq query tokens, Tk key tokens, H query heads, KV key/value heads (H % KV == 0), hd head dim, N sequences.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

MODES = ("auto", "naive")
ENV = "TIERED_SINK_ATTN"


def mode() -> str:
    """TIERED_SINK_ATTN: "auto" (default: flash where `usable`) or "naive" (always layers.sinks_attend)."""
    m = os.environ.get(ENV, "auto") or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r}: choose one of {MODES}")
    return m


def usable(q: Tensor) -> bool:
    """Whether flash_sinks may serve attention of queries like q [.., H, hd] here: CUDA at compute capability 8.0
    or more, fp16 or bf16, a head dim flash takes (a multiple of 8, at most 256), the op present in this torch, and
    TIERED_SINK_ATTN not "naive"."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or mode() == "naive":
        return False
    hd = q.shape[-1]
    if hd % 8 or hd > 256 or not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    return torch.cuda.get_device_capability(q.device) >= (8, 0)


def sink_scale(lse: Tensor, sinks: Tensor) -> Tensor:
    """The factor of each query row and head, [Tq, H] fp32, from flash's log-sum-exp lse [H, Tq] (natural log of
    the scaled scores) and the per-head sink logits sinks [H]: sigmoid(lse - sink)."""
    return torch.sigmoid(lse.float() - sinks.float()[:, None]).transpose(0, 1)


def unpad_lse(lse: Tensor, cu_seqlens: Tensor, total: int) -> Tensor:
    """A per-sequence padded log-sum-exp [N, H, max_len] -> [H, total] in token order, on the device (no host
    read of the lengths)."""
    t = torch.arange(total, device=lse.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), t, right=True)  # the sequence of each token
    return lse[seq, :, t - cu_seqlens.to(torch.int64)[seq]].transpose(0, 1)


def flash_sinks(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, *, scale: float, window: int | None = None,
                cu_seqlens: Tensor | None = None, max_len: int = 0) -> Tensor:
    """Causal attention with sinks.

    Args:
        q: [Tq, H, hd] (last dim contiguous).
        k, v: [Tk, KV, hd] (last dim contiguous; any row and head strides, e.g. a heads-first cache transposed).
        sinks: [H] fp32 logits (None: plain causal attention, no correction).
        scale: the scores' scale (hd ** -0.5).
        window: W, keys s > p - W only (None: every key up to p).
        cu_seqlens: int32 [N + 1], the sequences' starts in q and k alike (Tq == Tk): each attends within itself;
            None: one sequence, queries bottom-right aligned to the keys (Tq <= Tk).
        max_len: with cu_seqlens, the longest sequence.
    Returns:
        [Tq, H, hd] in q's dtype.
    """
    wl = -1 if window is None else int(window) - 1
    op = torch.ops.aten._flash_attention_forward
    if cu_seqlens is None:
        Tq, Tk = q.shape[0], k.shape[0]
        out, lse, *_ = op(q[None], k[None], v[None], None, None, Tq, Tk, 0.0, True, False, scale=scale,
                          window_size_left=wl, window_size_right=0)
        out, lse = out[0], lse.reshape(lse.shape[-2], lse.shape[-1])  # [Tq, H, hd], [H, Tq]
    else:
        out, lse, *_ = op(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale,
                          window_size_left=wl, window_size_right=0)
        if lse.dim() == 3:  # [N, H, max_len] (flash builds that pad it per sequence): back to [H, Tq]
            lse = unpad_lse(lse, cu_seqlens, q.shape[0])
    if sinks is None:
        return out
    return (out.float() * sink_scale(lse, sinks)[..., None]).to(q.dtype)
