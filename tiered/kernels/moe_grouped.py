"""Grouped expert GEMMs for prefill and batched decode: rows sorted by expert, one launch per projection.

Owns: `align_rows` (the (token, k) rows sorted by expert and padded to the block size, computed on the device with
static shapes: no host sync, no .tolist(); on CUDA one launch of `_align_kernel`, elsewhere `align_rows_torch`, the
kernel's reference), `GroupedMoE` (a layer's experts over those rows, in one or more waves of experts; SwiGLU, or
gpt-oss's clamped SwiGLU with its expert biases) with its Triton kernels `_grouped_gate_up_kernel` and
`_grouped_down_kernel` and `GroupedConfig`, the one-call `moe_grouped`, and `grouped_mm_layer`, the same computation
through torch._grouped_mm (kept to compare against; it needs a layer's experts as one [E, F, D] tensor and at most
1024 groups).
Does not own: which slots hold which experts (the provider), the decode kernel for T = 1 (moe_decode.py), the
reference (moe_naive.experts_loop).

The shape is vLLM's fused_moe: row r = t*K + k of the [T*K] (token, expert) pairs; `rows` lists them
grouped by expert, each group padded with the sentinel T*K to a multiple of BLOCK_M, and `block_expert`
names each block's expert (-1 past the end). A wave maps experts to slot rows (`slot_map`, -1 = not in
this wave); each launch covers every block and blocks of other waves return at once, so the grid depends
only on T, K, E and the block size and CUDA graphs can capture a resident layer. gate and up run in one
kernel (two accumulators sharing the x tile) and write h [T*K, F] in the compute dtype; the down kernel
scales each row by its routing weight and writes [T*K, D]; the K rows of a token are summed at the end,
as model/moe.py's loop does, so the result does not depend on the waves.

Legend: T tokens, D hidden, K top-k, F expert FFN, E experts per layer, S slots, P padded rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from tiered.kernels.fused_norm import act_fn
from tiered.kernels.moe_operands import ExpertOperands, check_built


@dataclass(frozen=True)
class GroupedConfig:
    """Tile sizes of the grouped kernels (powers of two, each >= 16 for tl.dot)."""
    block_m: int = 64  # rows (token, k) per block; each block belongs to one expert
    block_n: int = 64  # output columns per program (F for gate/up, D for down)
    block_k: int = 64  # reduction step (D for gate/up, F for down)
    warps: int = 4
    stages: int = 3
    split: int = 1  # programs sharing one output tile's reduction (quant_grouped.quant_matmul only; experts take 1)
    swap: int = 0  # quant_grouped's expert kernels only: 1-3 take each product transposed (weight tile first; 3
    #                scales applied after it: needs a step inside one group); 4 / 5 interleave the weight tile back
    #                into input order, one tl.dot a step (5: transposed)
    dq: int = 0  # swap 4 / 5 over q4: how codes become values (quant_grouped._wtile): 0 int->float conversions,
    #              1 exponent bits or-ed in (the same values, no conversion instruction), 2 in the compute dtype
    ps: int = 0  # swap 0, 1, 4, 5: 1 loads the next step's scales (and q4's minimums) during this step's products
    #              (quant_grouped._pair / _one), which Triton's pipeliner leaves as a stall in every step

    def __post_init__(self) -> None:
        if self.swap not in range(6):
            raise ValueError(f"GroupedConfig.swap must be 0-5, got {self.swap}")
        if self.dq not in (0, 1, 2):
            raise ValueError(f"GroupedConfig.dq must be 0, 1 or 2, got {self.dq}")
        if self.ps not in (0, 1) or (self.ps and self.swap in (2, 3)):
            raise ValueError(f"GroupedConfig.ps must be 0 or 1 (1 with swap 0, 1, 4 or 5), got ps {self.ps} with "
                             f"swap {self.swap}")
        for name in ("block_m", "block_n", "block_k", "warps", "split"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1) or (name.startswith("block") and v < 16):
                raise ValueError(f"GroupedConfig.{name} must be a power of two (>= 16 for blocks), got {v}")


def pick_config(rows: int, num_experts: int) -> GroupedConfig:
    """Block sizes by the mean rows per expert; each the fastest measured on the H200 at the 10.6B shape,
    E 128, K 8 (benchmarks/results/moe-kernels-2026-11-30-h200.json): T <= 128 tokens (<= 16 rows per
    expert) 96-391 us, T = 512 429 us, T = 2048 649 us per layer, against torch._grouped_mm's 101-499,
    550 and 947 us."""
    per = rows / max(1, min(num_experts, rows))
    if per <= 16:
        return GroupedConfig(block_m=16, block_n=64, block_k=128, warps=4, stages=4)
    if per <= 96:
        return GroupedConfig(block_m=64, block_n=64, block_k=64, warps=4, stages=4)
    return GroupedConfig(block_m=128, block_n=128, block_k=64, warps=8, stages=3)


@dataclass(frozen=True)
class AlignedRows:
    """(token, k) rows grouped by expert and padded, on the device."""
    rows: Tensor  # [P] int32: t*K + k, or the sentinel T*K in padding
    block_expert: Tensor  # [P / block_m] int64: expert of each block, -1 past the last
    num_rows: int  # T*K
    block_m: int


def padded_rows(n: int, num_experts: int, block_m: int) -> int:
    """P = n + min(E, n) * (block_m - 1), rounded up to block_m: enough rows for every expert's padding."""
    return -(-(n + min(num_experts, n) * (block_m - 1)) // block_m) * block_m


def align_rows(ids: Tensor, num_experts: int, block_m: int) -> AlignedRows:
    """ids [T, K] int64 experts in [0, E) -> AlignedRows; static shapes, no host sync (graph-capturable).
    On CUDA one launch (`_align_kernel`); elsewhere (and as its reference) `align_rows_torch`."""
    if not ids.is_cuda:
        return align_rows_torch(ids, num_experts, block_m)
    T, K = ids.shape
    n = T * K
    P = padded_rows(n, num_experts, block_m)
    rows = torch.empty(P, dtype=torch.int32, device=ids.device)
    be = torch.empty(P // block_m, dtype=torch.int64, device=ids.device)
    align_launch(ids.reshape(n), rows, be, num_experts, block_m)
    return AlignedRows(rows, be, n, block_m)


ALIGN_CHUNK = 1024  # ids an align program reads at a time


def align_launch(flat: Tensor, rows: Tensor, block_expert: Tensor, num_experts: int, block_m: int) -> None:
    """`_align_kernel` over flat [n] int64 expert ids into rows [P] int32 and block_expert [P / block_m] int64
    (every element written). Runs on CUDA or under Triton's interpreter (tests)."""
    n = flat.shape[0]
    _align_kernel[(num_experts,)](flat, rows, block_expert, n, rows.shape[0], E=num_experts,
                                  EP=triton.next_power_of_2(num_experts), BLOCK_M=block_m, CHUNK=ALIGN_CHUNK,
                                  num_warps=4)


@triton.jit
def _align_kernel(ids_ptr, rows_ptr, be_ptr, n, P, E: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr,
                  CHUNK: tl.constexpr):
    """Grid (E,): program e counts every expert's rows (a histogram of the ids), so it knows where its padded
    group starts (the sum of the padded counts before it), then writes its rows in (t, k) order (an exclusive
    prefix sum of its matches, chunk by chunk), the sentinel n into its padding, e into its blocks'
    block_expert, and its share of the tail past the last group (sentinel rows, block_expert -1). One launch
    for what align_rows_torch does in about twenty; the same result, element for element."""
    e = tl.program_id(0)
    counts = tl.zeros([EP], tl.int32)
    for c0 in range(0, n, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        m = offs < n
        x = tl.load(ids_ptr + offs, mask=m, other=0).to(tl.int32)
        counts += tl.histogram(x, EP, mask=m)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pend = tl.cumsum(padded, 0)
    mine = tl.arange(0, EP) == e
    end = tl.sum(tl.where(mine, pend, 0))
    pad = tl.sum(tl.where(mine, padded, 0))
    cnt = tl.sum(tl.where(mine, counts, 0))
    total = tl.sum(padded)
    start = end - pad
    base = start
    for c0 in range(0, n, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        m = offs < n
        hit = ((tl.load(ids_ptr + offs, mask=m, other=-1) == e) & m).to(tl.int32)
        tl.store(rows_ptr + base + tl.cumsum(hit, 0) - hit, offs, mask=hit != 0)
        base += tl.sum(hit)
    p = tl.arange(0, BLOCK_M)
    tl.store(rows_ptr + start + cnt + p, n, mask=p < pad - cnt)
    for b0 in range(0, pad // BLOCK_M, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        tl.store(be_ptr + start // BLOCK_M + b, e, mask=b < pad // BLOCK_M)
    for t0 in range(total + e * CHUNK, P, E * CHUNK):  # the tail, CHUNK rows a program in turn
        t = t0 + tl.arange(0, CHUNK)
        tm = t < P
        tl.store(rows_ptr + t, n, mask=tm)
        tl.store(be_ptr + t // BLOCK_M, -1, mask=tm & (t % BLOCK_M == 0))


def align_rows_torch(ids: Tensor, num_experts: int, block_m: int) -> AlignedRows:
    """align_rows in torch operations (about twenty launches on a GPU): the CPU path and the kernel's reference."""
    T, K = ids.shape
    n, dev = T * K, ids.device
    flat = ids.reshape(n)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones(n, dtype=torch.int64, device=dev))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    pend = torch.cumsum(padded, 0)  # [E] end of each expert's padded group
    cstart = torch.cumsum(counts, 0) - counts  # [E] start of each expert's rows, unpadded
    order = torch.argsort(flat, stable=True)  # [n] rows sorted by expert, (t, k) order inside
    e_sorted = flat.index_select(0, order)
    dest = (pend - padded).index_select(0, e_sorted) + torch.arange(n, device=dev) - cstart.index_select(0, e_sorted)
    P = padded_rows(n, num_experts, block_m)
    rows = torch.full((P,), n, dtype=torch.int32, device=dev).scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, P, block_m, device=dev)  # [P / block_m]
    be = torch.searchsorted(pend, starts, right=True)  # expert whose padded range holds the block start
    return AlignedRows(rows, torch.where(be < num_experts, be, -1), n, block_m)


@triton.jit
def _load_wt(ptrs, mask, WFMT: tl.constexpr, DT: tl.constexpr):
    """A weight tile in the dot's dtype DT. WFMT 0 (FLOAT): the stored elements; quantized formats add
    branches here (dequantizing a tile in registers, never a copy of the expert)."""
    return tl.load(ptrs, mask=mask, other=0.0).to(DT)


_act = triton.jit(act_fn)  # the gated activation in fp32 (SwiGLU, or gpt-oss's clamped form)


@triton.jit
def _grouped_gate_up_kernel(x_ptr, rows_ptr, bslot_ptr, gate_ptr, up_ptr, h_ptr, num_rows, stride_xt,
                            stride_gs, stride_gf, stride_us, stride_uf, D: tl.constexpr, F: tl.constexpr,
                            K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, WFMT: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
                            gb_ptr, ub_ptr, stride_bs, alpha, limit, HAS_BIAS: tl.constexpr = False):
    """Grid (cdiv(F, BLOCK_N), P / BLOCK_M): h[rows, n-block] = act(x[tok] @ gate.T + bg, x[tok] @ up.T + bu).
    HAS_BIAS: the slot's gate and up biases (rows of stride stride_bs) added in fp32 before the activation (gpt-oss;
    ACT 1 is its clamped SwiGLU with alpha and limit)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    slot = tl.load(bslot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    mask_m = rows < num_rows
    tok = (rows // K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < F
    a_ptrs = x_ptr + tok[:, None] * stride_xt
    g_ptrs = gate_ptr + slot * stride_gs + offs_n[None, :] * stride_gf
    u_ptrs = up_ptr + slot * stride_us + offs_n[None, :] * stride_uf
    DT = x_ptr.dtype.element_ty
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < D
        a = tl.load(a_ptrs + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mb = mask_k[:, None] & mask_n[None, :]
        acc_g = tl.dot(a, _load_wt(g_ptrs + offs_k[:, None], mb, WFMT, DT), acc=acc_g, input_precision=PREC)
        acc_u = tl.dot(a, _load_wt(u_ptrs + offs_k[:, None], mb, WFMT, DT), acc=acc_u, input_precision=PREC)
    if HAS_BIAS:
        acc_g += tl.load(gb_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(ub_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    h = _act(acc_g, acc_u, ACT, alpha, limit)
    tl.store(h_ptr + rows[:, None].to(tl.int64) * F + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_down_kernel(h_ptr, rows_ptr, bslot_ptr, wt_ptr, down_ptr, out_ptr, num_rows, stride_ds, stride_dd,
                         D: tl.constexpr, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, WFMT: tl.constexpr, PREC: tl.constexpr, db_ptr, stride_bs,
                         HAS_BIAS: tl.constexpr = False):
    """Grid (cdiv(D, BLOCK_N), P / BLOCK_M): out[rows, n-block] = w[rows] * (h[rows] @ down.T + bd). HAS_BIAS: the
    slot's down bias (a row of stride stride_bs) added to the product before the routing weight (gpt-oss)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    slot = tl.load(bslot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = rows < num_rows
    rows64 = rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    a_ptrs = h_ptr + rows64[:, None] * F
    b_ptrs = down_ptr + slot * stride_ds + offs_n[None, :] * stride_dd
    DT = h_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, F, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < F
        a = tl.load(a_ptrs + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = _load_wt(b_ptrs + offs_k[:, None], mask_k[:, None] & mask_n[None, :], WFMT, DT)
        acc = tl.dot(a, b, acc=acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(db_ptr + slot * stride_bs + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    w = tl.load(wt_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * D + offs_n[None, :], (acc * w[:, None]).to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


class GroupedMoE:
    """One layer's routed experts over T tokens, computed in waves of experts (one wave when all are at hand).

    Buffers are allocated at construction; each `wave` launches the two kernels once; `result` sums the
    K rows of every token. Every (token, k) row must be covered by exactly one wave.
    """

    def __init__(self, x: Tensor, ids: Tensor, weights: Tensor, num_experts: int,
                 config: GroupedConfig | None = None) -> None:
        """x [T, D] compute dtype, ids [T, K] int64 experts in [0, E), weights [T, K] routing weights."""
        T, K = ids.shape
        self.cfg = config or pick_config(T * K, num_experts)
        if self.cfg.split != 1:
            raise ValueError(f"the grouped expert kernels do not split the reduction: GroupedConfig.split must be 1, "
                             f"got {self.cfg.split} (split is quant_matmul's)")
        self.x = x.contiguous()
        self.K = K
        self.aligned = align_rows(ids, num_experts, self.cfg.block_m)
        self.weights = weights.reshape(T * K).contiguous()
        self.out = torch.empty(T * K, x.shape[1], dtype=x.dtype, device=x.device)  # [T*K, D]
        self.h: Tensor | None = None  # [T*K, F], made at the first wave (F comes with the operands)

    def wave(self, ops: ExpertOperands, slot_map: Tensor, act: Any = None) -> None:
        """Compute the rows of the experts that `slot_map` ([E] int64: slot row, -1 = not this wave) places.
        act: None (SwiGLU) or gpt-oss's ClampedSwiGLU (ExpertOperands.of); the experts' biases are applied."""
        ops = ExpertOperands.of(ops, act)
        check_built(ops)
        x, cfg, al = self.x, self.cfg, self.aligned
        D, Fe = x.shape[1], ops.ffn
        if D != ops.hidden:
            raise ValueError(f"x has hidden size {D}, the experts {ops.hidden}")
        if self.h is None:
            self.h = torch.empty(al.num_rows, Fe, dtype=x.dtype, device=x.device)
        be = al.block_expert
        bslot = torch.where(be >= 0, slot_map.index_select(0, be.clamp(min=0)), -1)  # [P / block_m]
        nb = be.shape[0]
        g, u, d = ops.gate, ops.up, ops.down
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        fmt = int(ops.fmt)
        gb, ub, sb = ops.bias_args(("gate_bias", "up_bias"))
        db, dbs = ops.bias_args(("down_bias",))
        _grouped_gate_up_kernel[(triton.cdiv(Fe, cfg.block_n), nb)](
            x, al.rows, bslot, g, u, self.h, al.num_rows, x.stride(0), g.stride(0), g.stride(1), u.stride(0),
            u.stride(1), D=D, F=Fe, K=self.K, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            WFMT=fmt, ACT=int(ops.act), PREC=prec, gb_ptr=gb, ub_ptr=ub, stride_bs=sb, alpha=ops.alpha,
            limit=ops.limit, HAS_BIAS=ops.has_bias, num_warps=cfg.warps, num_stages=cfg.stages)
        _grouped_down_kernel[(triton.cdiv(D, cfg.block_n), nb)](
            self.h, al.rows, bslot, self.weights, d, self.out, al.num_rows, d.stride(0), d.stride(1), D=D, F=Fe,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, WFMT=fmt, PREC=prec, db_ptr=db,
            stride_bs=dbs, HAS_BIAS=ops.has_bias, num_warps=cfg.warps, num_stages=cfg.stages)

    def result(self) -> Tensor:
        """[T, D] in x's dtype: the K rows of each token summed (fp32 accumulation, one rounding)."""
        T = self.aligned.num_rows // self.K
        return self.out.view(T, self.K, -1).sum(1)


def moe_grouped(x: Tensor, ids: Tensor, weights: Tensor, ops: ExpertOperands, slot_map: Tensor,
                config: GroupedConfig | None = None, *, act: Any = None) -> Tensor:
    """All experts in one wave: x [T, D], ids [T, K] experts, weights [T, K], slot_map [E] int64 (slot of
    each expert; every routed expert must have one) -> [T, D]. No host sync. act: None (SwiGLU) or gpt-oss's
    ClampedSwiGLU; the experts' biases, where they have them, are applied."""
    run = GroupedMoE(x, ids, weights, slot_map.shape[0], config)
    run.wave(ops, slot_map, act)
    return run.result()


def _grouped_mm():
    return getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_layer(x: Tensor, ids: Tensor, weights: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """The same computation through torch._grouped_mm, for one layer's experts held as one tensor.

    gate, up [E, F, D] and down [E, D, F] (views over a contiguous run of slots, e.g. a resident layer);
    E <= 1024 (torch's group limit). x [T, D] bf16, ids [T, K], weights [T, K] -> [T, D]. No host sync.
    """
    gmm = _grouped_mm()
    if gmm is None:
        raise RuntimeError("this torch has no grouped_mm")
    T, K = ids.shape
    E = gate.shape[0]
    if E > 1024:
        raise ValueError(f"torch grouped_mm takes at most 1024 groups, got {E} experts")
    flat = ids.reshape(T * K)
    order = torch.argsort(flat, stable=True)  # [T*K]
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones(T * K, dtype=torch.int32, device=x.device))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
    xs = x.index_select(0, order // K)  # [T*K, D] rows sorted by expert
    h = torch.nn.functional.silu(gmm(xs, gate.transpose(1, 2), offs=offs)) * gmm(xs, up.transpose(1, 2), offs=offs)
    y = gmm(h, down.transpose(1, 2), offs=offs)  # [T*K, D]
    y = y * weights.reshape(T * K).index_select(0, order).to(y.dtype)[:, None]
    out = torch.empty_like(y).index_copy_(0, order, y)
    return out.view(T, K, -1).sum(1)
