"""Fused MoE decode (T = 1 and small T): each chosen expert's gate, up and down read in place, once.

Owns: the Triton kernels `_gate_up_kernel`, `_down_kernel` and `_fused_kernel`, their `DecodeConfig`
and the launcher `moe_decode`. They read the experts straight from any pool with the block layout (the
resident copy, a VRAM slot pool) by slot row: no gathered copy of a weight is ever made. SwiGLU, the
routing weight and the sum over K happen inside the kernels, in fp32.
Does not own: which slots hold which experts (the provider), the reference (moe_naive.experts_loop),
prefill and batches (moe_grouped.py).

Two shapes, chosen by `DecodeConfig.variant`:
- "split": `_gate_up_kernel` writes h [T*K, F] (fp32, a few KiB), `_down_kernel` reads it and sums over
  K. With `down_split` = 1 each output is summed by one program in a fixed order: deterministic, and
  graph replays give identical bits. `down_split` > 1 spreads K over more programs (atomic fp32 adds).
- "fused": one kernel; each program finishes its slice of h and adds its share of the down projection
  into an fp32 output with atomics (non-deterministic order, one launch fewer plus a zero-fill and a cast).
Every program streams a [BLOCK_F, D] slice of one expert's gate and up (or [BLOCK_D, F] of its down), so
a layer's K experts spread over hundreds of programs and all SMs stream. Gather-free and sync-free:
slots are a device tensor and the grid depends only on T, K and the shapes, so CUDA graphs capture it.

Hooks for the formats and activations of moe_operands.py: `_load_w` (a weight tile to fp32; the
quantized formats add a branch reading codes and scales) and `_act` (SwiGLU; gpt-oss's clamped form, ACT 1,
with its expert biases: gate and up biases added before the activation, the down bias to each expert's output
before its routing weight; "split" only).

Legend: T tokens, D hidden, K top-k, F expert FFN, S slots in the pool.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from tiered.kernels.fused_norm import act_fn, bias_sum_fn, round_weight, weight_rounding
from tiered.kernels.moe_operands import ExpertOperands, check_built
from tiered.kernels.pdl import gdc_enter, launch_args


@dataclass(frozen=True)
class Landing:
    """One token's misses, copied by the gather right before the experts (kernels/slot_table.gather), for the
    device step's overlapped gather. src int64 [K]: each pair's RAM row (>= 0: a miss the gather copies; -1:
    resident). count int32 [K]: each pair's landed chunks (the gather's `landed`). done int32 [K], zero before the
    experts (with down_waits_per_pair): each pair's finished gate_up programs.

    copying (the overlap): under PDL, gate_up starts once every gather program is resident, so a waiting program
    never keeps a copy from running. gate_up does not wait for the gather: a missed pair's programs wait until
    count reaches `chunks`, then acquire and read the slot; the resident pairs compute at once. down waits for
    gate_up as a whole, unless down_waits_per_pair: then it starts once every gate_up program is resident and sums
    the resident pairs once all their gate_up programs are done, then the copied ones (one acquire a group). What
    either reads besides must come from kernels before the gather. Not copying: both kernels wait as usual.
    Either way down sums the resident pairs first, then the missed ones (each group in k order), so the sums, and
    the bits, do not depend on `copying` (and equal a plain call with the pairs in that order)."""
    count: Tensor
    src: Tensor
    chunks: int
    done: Tensor | None = None
    copying: bool = True
    down_waits_per_pair: bool = True  # False: down waits for gate_up as a whole (the device step's default)


@dataclass(frozen=True)
class DecodeConfig:
    """Tile sizes of the decode kernels (all powers of two). Defaults: the fastest deterministic tiles
    measured at the 10.6B shape (benchmarks/results/moe-kernels-2026-11-30-h200.json); `for_shape` picks."""
    variant: str = "split"  # "split" (gate_up, then down) or "fused" (one kernel, atomic down)
    block_f: int = 4  # gate/up rows (F) per program
    block_d: int = 512  # gate/up input columns (D) per step
    warps: int = 2  # warps per gate/up (or fused) program
    down_block_d: int = 4  # down rows (D) per program ("split")
    down_block_f: int = 1024  # down input columns (F) per step ("split")
    down_split: int = 1  # programs sharing one token's K experts ("split"; > 1: fp32 atomics)
    down_warps: int = 8
    block_o: int = 64  # down rows per atomic step ("fused")

    def __post_init__(self) -> None:
        if self.variant not in ("split", "fused"):
            raise ValueError(f"DecodeConfig.variant must be 'split' or 'fused', got {self.variant!r}")
        for name in ("block_f", "block_d", "down_block_d", "down_block_f", "block_o", "warps", "down_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"DecodeConfig.{name} must be a power of two, got {v}")

    @classmethod
    def for_shape(cls, hidden: int, ffn: int) -> "DecodeConfig":
        """Measured on the H200 (T = 1, bf16, deterministic split): D 2048 / F 768 -> 25.1 us per layer of
        K = 8 (3.0 TB/s, 0.68 of the 4.39 TB/s read bound); D 4096 / F 1024 -> the tiles below, 65.5 us
        for K = 10 (3.8 TB/s, 0.87). The fused variant was slower at both shapes (43 and 203 us)."""
        if hidden >= 4096:
            return cls(block_f=4, block_d=1024, warps=4, down_block_d=8, down_block_f=256, down_warps=4)
        return cls()


@triton.jit
def _load_w(ptrs, mask, WFMT: tl.constexpr):
    """A weight tile in fp32. WFMT 0 (FLOAT): the stored elements; quantized formats add branches here."""
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


_act = triton.jit(act_fn)
_bias_sum = triton.jit(bias_sum_fn)


@triton.jit
def _gate_up_rows(x_ptr, gate_ptr, up_ptr, t, slot, offs_f, mask_f, stride_xt, stride_gs, stride_gf,
                  stride_us, stride_uf, D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                  WFMT: tl.constexpr, ACT: tl.constexpr, gb_ptr=None, ub_ptr=None, stride_bs=0, alpha=1.702,
                  limit=7.0, HAS_BIAS: tl.constexpr = False):
    """act(x[t] @ gate[slot][offs_f].T (+ gate bias), x[t] @ up[slot][offs_f].T (+ up bias)) -> [BLOCK_F] fp32
    (0 where masked)."""
    g_rows = gate_ptr + slot * stride_gs + offs_f[:, None] * stride_gf
    u_rows = up_ptr + slot * stride_us + offs_f[:, None] * stride_uf
    x_row = x_ptr + t * stride_xt
    acc_g = tl.zeros([BLOCK_F, BLOCK_D], tl.float32)
    acc_u = tl.zeros([BLOCK_F, BLOCK_D], tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xv = tl.load(x_row + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        m = mask_f[:, None] & mask_d[None, :]
        acc_g += _load_w(g_rows + offs_d[None, :], m, WFMT) * xv
        acc_u += _load_w(u_rows + offs_d[None, :], m, WFMT) * xv
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    if HAS_BIAS:
        g += tl.load(gb_ptr + slot * stride_bs + offs_f, mask=mask_f, other=0.0).to(tl.float32)
        u += tl.load(ub_ptr + slot * stride_bs + offs_f, mask=mask_f, other=0.0).to(tl.float32)
    return _act(g, u, ACT, alpha, limit)


@triton.jit
def _acquire_fence(v):
    """fence.acq_rel.gpu in each thread (after its volatile read of a count another kernel released): the thread's
    later reads see what was written before that release. v passes through (the asm's operand)."""
    return tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _pause(v, NS: tl.constexpr):
    """nanosleep.u32 NS in each thread (a spinning program's back-off: fewer loads on the L2 beside the copies and
    the experts it waits for); v passes through (the asm's operand)."""
    return tl.inline_asm_elementwise(f"nanosleep.u32 {NS}; mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _gate_up_kernel(x_ptr, slot_ptr, gate_ptr, up_ptr, h_ptr, slot_base, stride_xt, stride_gs, stride_gf,
                    stride_us, stride_uf, gb_ptr, ub_ptr, stride_bs, alpha, limit, D: tl.constexpr, F: tl.constexpr,
                    K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, WFMT: tl.constexpr,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr = False, GDC: tl.constexpr = False,
                    land_ptr=None, src_ptr=None, n_land=0, done_ptr=None, WAIT: tl.constexpr = False,
                    FENCE: tl.constexpr = False, DONE: tl.constexpr = False):
    """Grid (cdiv(F, BLOCK_F), T*K): h[t*K + k, f-block] of token t's k-th expert (row slot_base + slot), fp32;
    HAS_BIAS: the gate and up biases [S, F] (row stride stride_bs) added before the activation. WAIT (T = 1,
    `Landing`): a pair whose src_ptr row is >= 0 waits until land_ptr[pair] reaches n_land (its copy by the
    gather launched before this kernel has landed), then acquires it and its program reads the slot. With WAIT the
    kernel does not wait for the previous one (the gather, under PDL): it reads what kernels before the gather
    wrote, and the gather's rows through the counts; it lets its dependents launch at once. DONE: each program
    raises done_ptr[pair] (release) once its rows of h are stored (for a down kernel that waits per pair)."""
    if WAIT:
        if GDC:
            tl.extra.cuda.gdc_launch_dependents()
    else:
        gdc_enter(GDC)
    pid_f = tl.program_id(0)
    pair = tl.program_id(1)  # t * K + k
    if WAIT:
        if tl.load(src_ptr + pair) >= 0:
            n = tl.load(land_ptr + pair, volatile=True)
            while n < n_land:
                n = tl.load(land_ptr + pair, volatile=True)
            if FENCE:  # the acquire pattern (a strong read of the release, then this fence) before the slot's reads
                n = _acquire_fence(n)
    slot = tl.load(slot_ptr + pair).to(tl.int64) + slot_base
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    h = _gate_up_rows(x_ptr, gate_ptr, up_ptr, pair // K, slot, offs_f, mask_f, stride_xt, stride_gs, stride_gf,
                      stride_us, stride_uf, D, BLOCK_F, BLOCK_D, WFMT, ACT, gb_ptr, ub_ptr, stride_bs, alpha, limit,
                      HAS_BIAS)
    tl.store(h_ptr + pair * F + offs_f, h, mask=mask_f)
    if DONE:  # this program's rows of h are written: one release of done[pair] += 1 (the down kernel waits on it)
        tl.debug_barrier()
        tl.atomic_add(done_ptr + pair, 1, sem="release", scope="gpu")


@triton.jit
def _down_pair(acc, h_ptr, slot_ptr, wt_ptr, down_ptr, pair, slot_base, stride_ds, stride_dd, offs_d, mask_d,
               F: tl.constexpr, BLOCK_F: tl.constexpr, WFMT: tl.constexpr, WR: tl.constexpr):
    """acc [BLOCK_D, BLOCK_F] += one pair's w * down[d-block, :] * h[pair, :] (fp32)."""
    slot = tl.load(slot_ptr + pair).to(tl.int64) + slot_base
    w = round_weight(tl.load(wt_ptr + pair).to(tl.float32), WR)
    rows = down_ptr + slot * stride_ds + offs_d[:, None] * stride_dd
    for f0 in tl.static_range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < F
        hv = tl.load(h_ptr + pair * F + offs_f, mask=mask_f, other=0.0) * w
        acc += _load_w(rows + offs_f[None, :], mask_d[:, None] & mask_f[None, :], WFMT) * hv[None, :]
    return acc


@triton.jit
def _down_kernel(h_ptr, slot_ptr, wt_ptr, down_ptr, y_ptr, slot_base, stride_ds, stride_dd, stride_yt, db_ptr,
                 stride_bs, D: tl.constexpr, F: tl.constexpr, K: tl.constexpr, K_PER: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, WFMT: tl.constexpr,
                 WR: tl.constexpr = 0, HAS_BIAS: tl.constexpr = False, KP: tl.constexpr = 1,
                 GDC: tl.constexpr = False, src_ptr=None, done_ptr=None, n_done=0, ORDER: tl.constexpr = False,
                 WAIT: tl.constexpr = False, FENCE: tl.constexpr = False):
    """Grid (cdiv(D, BLOCK_D), T*SPLIT): y[t, d-block] = sum over K_PER experts of w * (h @ down.T (+ down bias,
    HAS_BIAS: [S, D], split 1 only)); w rounded as fused_norm.weight_rounding says (WR).
    ORDER (`Landing`): the pairs whose src_ptr row is -1 (resident) first, then the others, each group in k order.
    WAIT (with ORDER, T = 1): no wait for gate_up (under PDL); each group is summed once done_ptr reaches n_done
    (its gate_up programs) for every pair of the group, acquired once (an acquire a pair would drain the loads of
    the pair before it at each fence); dependents may launch at once."""
    if WAIT:
        if GDC:
            tl.extra.cuda.gdc_launch_dependents()
    else:
        gdc_enter(GDC)
    pid_d = tl.program_id(0)
    pid = tl.program_id(1)  # t * SPLIT + part
    t = pid // SPLIT
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D, BLOCK_F], tl.float32)
    if ORDER:
        first = t * K + (pid % SPLIT) * K_PER
        ok = tl.arange(0, KP)
        for phase in tl.static_range(2):  # 0: the resident pairs, 1: the copied ones
            if WAIT:  # every pair of the phase done (one acquire a phase: the pairs' loads stay pipelined)
                src = tl.load(src_ptr + first + ok, mask=ok < K_PER, other=-1)
                mine = (ok < K_PER) & ((src >= 0) == (phase == 1))
                n = tl.min(tl.load(done_ptr + first + ok, mask=mine, other=n_done, volatile=True), axis=0)
                while n < n_done:
                    if FENCE:  # (CUDA: the interpreter has no nanosleep)
                        n = _pause(n, 128)
                    n = tl.min(tl.load(done_ptr + first + ok, mask=mine, other=n_done, volatile=True), axis=0)
                if FENCE:
                    n = _acquire_fence(n)
            for kk in tl.static_range(K_PER):
                pair = first + kk
                if (tl.load(src_ptr + pair) >= 0) == (phase == 1):
                    acc = _down_pair(acc, h_ptr, slot_ptr, wt_ptr, down_ptr, pair, slot_base, stride_ds, stride_dd,
                                     offs_d, mask_d, F, BLOCK_F, WFMT, WR)
    else:
        for kk in tl.static_range(K_PER):
            pair = t * K + (pid % SPLIT) * K_PER + kk
            acc = _down_pair(acc, h_ptr, slot_ptr, wt_ptr, down_ptr, pair, slot_base, stride_ds, stride_dd, offs_d,
                             mask_d, F, BLOCK_F, WFMT, WR)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += _bias_sum(db_ptr, slot_ptr, wt_ptr, t, offs_d, mask_d, slot_base, stride_bs, K, KP, WR)
    if SPLIT == 1:
        tl.store(y_ptr + t * stride_yt + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    else:
        tl.atomic_add(y_ptr + t * stride_yt + offs_d, y, mask=mask_d, sem="relaxed")


@triton.jit
def _fused_kernel(x_ptr, slot_ptr, wt_ptr, gate_ptr, up_ptr, down_ptr, y_ptr, slot_base, stride_xt, stride_gs,
                  stride_gf, stride_us, stride_uf, stride_ds, stride_dd, stride_yt, D: tl.constexpr, F: tl.constexpr,
                  K: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
                  WFMT: tl.constexpr, ACT: tl.constexpr, WR: tl.constexpr = 0, GDC: tl.constexpr = False):
    """Grid (cdiv(F, BLOCK_F), T*K): h's f-block, times w, through down[:, f-block] into fp32 y (atomics)."""
    gdc_enter(GDC)
    pid_f = tl.program_id(0)
    pair = tl.program_id(1)
    t = pair // K
    slot = tl.load(slot_ptr + pair).to(tl.int64) + slot_base
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask_f = offs_f < F
    h = _gate_up_rows(x_ptr, gate_ptr, up_ptr, t, slot, offs_f, mask_f, stride_xt, stride_gs, stride_gf,
                      stride_us, stride_uf, D, BLOCK_F, BLOCK_D, WFMT, ACT)
    h = h * round_weight(tl.load(wt_ptr + pair).to(tl.float32), WR)
    cols = down_ptr + slot * stride_ds + offs_f[None, :]
    for o0 in tl.static_range(0, D, BLOCK_O):
        offs_o = o0 + tl.arange(0, BLOCK_O)
        mask_o = offs_o < D
        dw = _load_w(cols + offs_o[:, None] * stride_dd, mask_o[:, None] & mask_f[None, :], WFMT)
        tl.atomic_add(y_ptr + t * stride_yt + offs_o, tl.sum(dw * h[None, :], axis=1), mask=mask_o, sem="relaxed")


def _prep(x: Tensor, slots: Tensor, ops: ExpertOperands, act=None) -> tuple[ExpertOperands, Tensor, Tensor, int]:
    ops = ExpertOperands.of(ops, act)
    check_built(ops)
    T, D = x.shape
    if D != ops.hidden:
        raise ValueError(f"x has hidden size {D}, the experts {ops.hidden}")
    if slots.numel() % T:
        raise ValueError(f"{slots.numel()} slots for {T} tokens: want [T, K]")
    return ops, x.contiguous(), slots.reshape(-1).contiguous(), slots.numel() // T


def _check_landing(wait: Landing, T: int, K: int) -> None:
    bad = (T != 1 or wait.count.shape != (K,) or wait.src.shape != (K,) or wait.count.dtype != torch.int32
           or (wait.copying and wait.down_waits_per_pair
               and (wait.done is None or wait.done.shape != (K,) or wait.done.dtype != torch.int32)))
    if bad:
        done = None if wait.done is None else f"{wait.done.dtype} {tuple(wait.done.shape)}"
        raise ValueError(f"moe_decode(wait=...) serves one token's K = {K} pairs: count and done int32 [{K}] and src "
                         f"[{K}]; got T = {T}, count {wait.count.dtype} {tuple(wait.count.shape)}, src "
                         f"{tuple(wait.src.shape)}, done {done}")


def gate_up_programs(ffn: int, config: DecodeConfig) -> int:
    """The gate_up kernel's programs a pair (what Landing.done counts to)."""
    return triton.cdiv(ffn, config.block_f)


def decode_gate_up(x: Tensor, slots: Tensor, ops: ExpertOperands, config: DecodeConfig | None = None, *,
                   slot_base: int = 0, act=None, wait: Landing | None = None) -> Tensor:
    """The first kernel of the "split" variant: x [T, D], slots [T, K] (rows slot_base + slots) -> h [T*K, F]
    fp32. act: None (SwiGLU) or gpt-oss's ClampedSwiGLU (ExpertOperands.of); the experts' biases are applied.
    wait (T = 1): the misses still copying (`Landing`); their programs wait for their rows, the others run."""
    ops, x, slots, K = _prep(x, slots, ops, act)
    T, D = x.shape
    cfg = config or DecodeConfig.for_shape(D, ops.ffn)
    Fe = ops.ffn
    g, u = ops.gate, ops.up
    h = torch.empty(T * K, Fe, dtype=torch.float32, device=x.device)  # [T*K, F]
    gb, ub, sb = ops.bias_args(("gate_bias", "up_bias"))
    if wait is not None:
        _check_landing(wait, T, K)
    per_pair = wait is not None and wait.copying and wait.down_waits_per_pair
    land = ({"land_ptr": wait.count, "src_ptr": wait.src, "n_land": int(wait.chunks),
             "done_ptr": wait.done if per_pair else slots, "WAIT": True, "DONE": per_pair,
             "FENCE": x.device.type == "cuda"}  # (the interpreter runs kernels in turn: no fence)
            if wait is not None and wait.copying
            else {"land_ptr": slots, "src_ptr": slots, "n_land": 0, "done_ptr": slots, "WAIT": False})
    _gate_up_kernel[(gate_up_programs(Fe, cfg), T * K)](
        x, slots, g, u, h, int(slot_base), x.stride(0), g.stride(0), g.stride(1), u.stride(0), u.stride(1), gb, ub,
        sb, ops.alpha, ops.limit, D=D, F=Fe, K=K, BLOCK_F=cfg.block_f,
        BLOCK_D=min(cfg.block_d, triton.next_power_of_2(D)), WFMT=int(ops.fmt), ACT=int(ops.act),
        HAS_BIAS=ops.has_bias, num_warps=cfg.warps, **launch_args(x.device), **land)
    return h


def decode_down(h: Tensor, slots: Tensor, weights: Tensor, ops: ExpertOperands, dtype: torch.dtype,
                config: DecodeConfig | None = None, *, slot_base: int = 0,
                round_to: torch.dtype | None = None, wait: Landing | None = None) -> Tensor:
    """The second kernel of the "split" variant: h [T*K, F] fp32, slots and weights [T, K] -> [T, D] dtype
    (rows slot_base + slots; weights rounded to `round_to` in the kernel, None: as given); the experts' down
    biases, where they have them, are added to each expert's output before its weight (one program sums a row's
    K experts then: no split). wait (T = 1, `Landing`): the resident pairs summed first; with `copying` and
    `down_waits_per_pair`, each group once its pairs' gate_up programs are done, without waiting for gate_up as a
    whole."""
    ops = ExpertOperands.of(ops)
    D, Fe = ops.hidden, ops.ffn
    cfg = config or DecodeConfig.for_shape(D, Fe)
    K = slots.shape[-1]
    T = h.shape[0] // K
    slots = slots.reshape(-1).contiguous()
    weights = weights.reshape(-1).contiguous()
    d = ops.down
    split = cfg.down_split if K % cfg.down_split == 0 and not ops.has_bias else 1
    y = (torch.empty(T, D, dtype=dtype, device=h.device) if split == 1
         else torch.zeros(T, D, dtype=torch.float32, device=h.device))
    db, sb = ops.bias_args(("down_bias",))
    if wait is not None:
        _check_landing(wait, T, K)
        per_pair = wait.copying and wait.down_waits_per_pair
        order = {"src_ptr": wait.src, "ORDER": True, "WAIT": per_pair, "FENCE": per_pair and h.device.type == "cuda",
                 "done_ptr": wait.done if per_pair else slots, "n_done": gate_up_programs(Fe, cfg)}
    else:
        order = {}
    _down_kernel[(triton.cdiv(D, cfg.down_block_d), T * split)](
        h, slots, weights, d, y, int(slot_base), d.stride(0), d.stride(1), y.stride(0), db, sb, D=D, F=Fe, K=K,
        K_PER=K // split, SPLIT=split, BLOCK_D=cfg.down_block_d,
        BLOCK_F=min(cfg.down_block_f, triton.next_power_of_2(Fe)), WFMT=int(ops.fmt), WR=weight_rounding(round_to),
        HAS_BIAS=ops.has_bias, KP=triton.next_power_of_2(K), num_warps=cfg.down_warps, **launch_args(h.device),
        **order)
    return y if split == 1 else y.to(dtype)


def moe_decode(x: Tensor, slots: Tensor, weights: Tensor, ops: ExpertOperands,
               config: DecodeConfig | None = None, *, slot_base: int = 0,
               round_to: torch.dtype | None = None, act=None, wait: Landing | None = None) -> Tensor:
    """Routed experts of T tokens, read in place from a pool.

    Args:
        x: [T, D] expert input (compute dtype).
        slots: [T, K] (or [K] when T = 1) int64/int32 slot rows of `ops`, on x's device.
        weights: [T, K] routing weights (fp32 or compute dtype).
        ops: ExpertOperands (or store.disk.ExpertWeights) over the pool.
        config: tile sizes; DecodeConfig.for_shape(D, F) when None.
        slot_base: added to every slot inside the kernels (the resident pool's layer * E: no add kernel).
        round_to: round the (fp32) weights to this dtype inside the kernels, as a cast before the call would;
            None = as given.
        act: None (SwiGLU) or gpt-oss's ClampedSwiGLU (model/moe.py); the experts' biases (ops' gate_bias,
            up_bias, down_bias) are applied whenever the operands carry them.
        wait: T = 1, the "split" variant: the misses the gather launched right before is still copying
            (`Landing`); the resident experts compute meanwhile, and are summed first.
    Returns:
        [T, D] in x's dtype: sum over k of weights[t, k] * expert(slots[t, k])(x[t]).
    """
    ops, x, flat, K = _prep(x, slots, ops, act)
    T, D = x.shape
    cfg = config or DecodeConfig.for_shape(D, ops.ffn)
    weights = weights.reshape(T, K)
    if cfg.variant == "fused" and (ops.has_bias or ops.act != 0):
        raise NotImplementedError("moe_decode: the fused variant computes SwiGLU without biases; use 'split'")
    if wait is not None and cfg.variant != "split":
        raise NotImplementedError("moe_decode(wait=...): only the 'split' variant waits for landing rows")
    if cfg.variant == "split":
        h = decode_gate_up(x, flat, ops, cfg, slot_base=slot_base, wait=wait)
        return decode_down(h, flat.view(T, K), weights, ops, x.dtype, cfg, slot_base=slot_base, round_to=round_to,
                           wait=wait)
    Fe = ops.ffn
    g, u, d = ops.gate, ops.up, ops.down
    weights = weights.reshape(-1).contiguous()
    y32 = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    _fused_kernel[(triton.cdiv(Fe, cfg.block_f), T * K)](
        x, flat, weights, g, u, d, y32, int(slot_base), x.stride(0), g.stride(0), g.stride(1), u.stride(0),
        u.stride(1), d.stride(0), d.stride(1), y32.stride(0), D=D, F=Fe, K=K, BLOCK_F=cfg.block_f,
        BLOCK_D=min(cfg.block_d, triton.next_power_of_2(D)), BLOCK_O=cfg.block_o, WFMT=int(ops.fmt),
        ACT=int(ops.act), WR=weight_rounding(round_to), num_warps=cfg.warps, **launch_args(x.device))
    return y32.to(x.dtype)
