"""One token's routing in Triton: the softmax-then-top-k rule (Mixtral, Qwen, OLMoE), and the router GEMV before it.

Owns: `softmax_topk(logits, top_k, norm_topk)` -> (ids [T, K] int64, weights [T, K] fp32), the same contract as
model/routing.py's `softmax_topk` (the torch reference, which the CPU path keeps and the tests compare with);
`router_topk` (one token: the router GEMV, then the rule) and `norm_router_topk` (the residual add and RMSNorm
before the router too, in the same launch), and `router_mode` (TIERED_ROUTER).
Does not own: the other rules (gpt-oss's top-k-then-softmax and DeepSeek's grouped sigmoid stay on torch:
model/routing.py), routers with a bias, nor what happens to the ids afterwards.

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

The router GEMV with it (`router_topk`, one token): logits = x @ router.T in fp32, rounded to the compute dtype
(F.linear's result; the fp32 sum runs in another order than cuBLAS's, so a logit may round to the neighbouring
value where the fp32 sum sits within an ulp of a rounding boundary), then the same rule. Each program owns BLOCK_R
router rows; the router's first BLOCK_D columns are loaded before the PDL wait (they do not depend on the previous
kernel), so that load overlaps the previous kernel's tail. Unfused (`fuse=False`, the model's default): the
softmax_topk kernel runs after the GEMV. Fused: each program stores its logits, then counts itself done on a
per-layer int32 counter (acq_rel); the program that finds the count complete loads every logit and runs
softmax-top-k, then sets the counter back to 0 for the next step (the counter must be 0 when a launch starts; a
CUDA graph replays the same buffer). On the H200 the fused launch is the slower (its last program's serial tail
and the count cost more than the second launch, which PDL overlaps): 4.7 against 3.2 us a layer at the 10.6B
shape (benchmarks/results/quant-router-2026-12-02-h200-s16.json). With the norm in (`norm_router_topk`), every
program first sums the squares of round(h + delta) over the row, then normalises each chunk for its dot; program 0
writes h' and x for the kernels after it (one add+norm launch a layer fewer: 3.95 against 4.41 us a layer with
the add+norm kernel, the same file). TIERED_ROUTER picks the model's path: gemv (default), fused, torch (cuBLAS
F.linear + softmax_topk).

Legend: T tokens, E experts, K top-k, D hidden.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from tiered.kernels.fused_norm import _check_device, _round_to, _warps, triton, tl
from tiered.kernels.pdl import gdc_enter, launch_args


def softmax_topk(logits: Tensor, top_k: int, norm_topk: bool,
                 lookup: tuple | None = None) -> tuple[Tensor, Tensor]:
    """logits [T, E] (any float dtype) -> ids [T, K] int64, weights [T, K] fp32 (routing.softmax_topk's contract).
    lookup = (slot_of int32 [N], base, slots int64 [K], bad int64 [1]) (one token): the chosen experts' slots in a
    complete device slot table too, slots[k] = slot_of[base + ids[k]] (kernels/slot_table.lookup's contract: a key
    not resident reads slot 0 and raises bad to at least key + 1); with (host_row int64 [N], src int64 [K], counts
    int64 [>= 2]) after those, lookup's `load`: a planned key is loaded into its reserved slot, its RAM row to src."""
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
    load = lookup is not None and len(lookup) == 7
    if lookup is not None:
        slot_of, base, slots, bad = lookup[:4]
        host_row, src, counts = lookup[4:] if load else (ids, ids, ids)  # (placeholders, never read)
        if T != 1 or slots.shape != (K,) or slots.dtype != torch.int64 or slot_of.dtype != torch.int32 \
                or bad.dtype != torch.int64 or not slots.is_contiguous() or (load and src.shape != (K,)):
            raise ValueError(f"softmax_topk(lookup=...) is one token's: slot_of int32, slots (and src) int64 [{K}] "
                             f"contiguous, bad int64; got T={T}, {slot_of.dtype}, {slots.dtype} {tuple(slots.shape)}, "
                             f"{bad.dtype}")
    else:
        slot_of, base, slots, bad, host_row, src, counts = ids, 0, ids, ids, ids, ids, ids  # placeholders, never read
    block = triton.next_power_of_2(E)
    _SOFTMAX_TOPK[(T,)](lg, ids, w, E, lg.stride(0), slot_of, int(base), slots, bad, host_row, src, counts, K=K,
                        K_P=triton.next_power_of_2(K), BLOCK_E=block, NORM=bool(norm_topk),
                        LOOKUP=lookup is not None, LOAD=load, num_warps=_warps(block), **launch_args(logits.device))
    return ids, w


ROUTER_ENV = "TIERED_ROUTER"
ROUTER_MODES = ("fused", "gemv", "torch")


def router_mode() -> str:
    """TIERED_ROUTER: gemv (default: the router GEMV kernel, then softmax_topk's), fused (GEMV and softmax-top-k in
    one launch: slower on the H200, benchmarks/results/quant-router-2026-12-02-h200-s16.json), torch (F.linear,
    then softmax_topk's kernel)."""
    mode = os.environ.get(ROUTER_ENV, "gemv").strip().lower() or "gemv"
    if mode not in ROUTER_MODES:
        raise ValueError(f"{ROUTER_ENV}={mode!r}: expected one of {', '.join(ROUTER_MODES)}")
    return mode


def router_tile(E: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_R rows a program, BLOCK_D columns a step, warps) for a router [E, D]: enough programs to spread the
    router's bytes over the SMs (E / BLOCK_R of them), a whole row of up to 2,048 columns in one load."""
    block_d = min(triton.next_power_of_2(D), 2048)
    block_r = 1 if E <= 128 else 2 if E <= 256 else 4
    return block_r, block_d, 4 if block_r * block_d <= 4096 else 8


def router_topk(x: Tensor, router: Tensor, top_k: int, norm_topk: bool, counter: Tensor, *,
                fuse: bool = False, tile: tuple[int, int, int] | None = None,
                defer: bool = False, lookup: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One token's router and routing rule: x [1, D], router [E, D] (same dtype), counter int32 [1] at 0 ->
    (logits [1, E] x.dtype, ids [1, K] int64, weights [1, K] fp32), route(x, router, K, norm, rule=softmax_topk)'s
    contract. fuse: softmax-top-k in the same launch (else softmax_topk's kernel after it); counter: read and reset
    by fused launches only. tile: (BLOCK_R, BLOCK_D, warps), default router_tile(E, D). defer (unfused only): no
    softmax-top-k launch; ids and weights are left unwritten for the kernel after it to fill (the device step's
    resolve: kernels/slot_table.resolve(topk=...)). lookup (unfused, not deferred): softmax_topk's, the chosen
    experts' slots in a complete device slot table."""
    _check_device(x, "router_topk")
    if x.dim() != 2 or x.shape[0] != 1 or router.dim() != 2 or router.shape[1] != x.shape[1]:
        raise ValueError(f"router_topk wants x [1, D] and router [E, D]; got {tuple(x.shape)}, {tuple(router.shape)}")
    xc = x if x.stride(-1) == 1 else x.contiguous()
    return _launch(xc, None, router, top_k, norm_topk, counter, fuse, tile, defer, lookup)


def norm_router_topk(h: Tensor, delta: Tensor, weight: Tensor, eps: float, router: Tensor, top_k: int,
                     norm_topk: bool, counter: Tensor, *, fuse: bool = False,
                     tile: tuple[int, int, int] | None = None, defer: bool = False,
                     lookup: tuple | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The residual add and RMSNorm before the router in the same launch (one token): h, delta [1, D], weight [D]
    (compute dtype or fp32) -> (h' = h + delta, x = rms_norm(h', weight), logits, ids, weights): what
    fused_norm.add_rms_norm(h, delta, weight, eps) then router_topk(x, ...) return, with the same roundings (the
    sum of squares in this kernel's order). Every program computes x for its dot; program 0 writes h' and x.
    defer, lookup: as router_topk's."""
    _check_device(h, "norm_router_topk")
    D = h.shape[-1]
    if h.dim() != 2 or h.shape[0] != 1 or delta.shape != h.shape or weight.shape != (D,) or router.dim() != 2 \
            or router.shape[1] != D:
        raise ValueError(f"norm_router_topk wants h, delta [1, D], weight [D], router [E, D]; got {tuple(h.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(weight.shape)}, {tuple(router.shape)}")
    norm = (h if h.stride(-1) == 1 else h.contiguous(), delta if delta.stride(-1) == 1 else delta.contiguous(),
            weight if weight.stride(0) == 1 else weight.contiguous(), float(eps))
    x = torch.empty_like(norm[0])
    h2 = torch.empty_like(norm[0])
    logits, ids, w = _launch(x, (*norm, h2), router, top_k, norm_topk, counter, fuse, tile, defer, lookup)
    return h2, x, logits, ids, w


def _launch(x: Tensor, norm: tuple | None, router: Tensor, top_k: int, norm_topk: bool, counter: Tensor, fuse: bool,
            tile: tuple[int, int, int] | None, defer: bool = False,
            lookup: tuple | None = None) -> tuple[Tensor, Tensor, Tensor]:
    if defer and fuse:
        raise ValueError("router_topk: defer leaves the top-k to the next kernel; a fused launch computes it")
    if lookup is not None and (defer or fuse):
        raise ValueError("router_topk: lookup runs in the softmax_topk launch (not with fuse or defer)")
    if router.dtype != x.dtype or router.stride(-1) != 1:
        raise ValueError(f"router_topk wants a contiguous router of x's dtype {x.dtype}; got {router.dtype}, "
                         f"strides {router.stride()}")
    E, D = router.shape
    K = int(top_k)
    if not 0 < K <= E:
        raise ValueError(f"router_topk: top_k={K} with {E} experts")
    br, bd, warps = tile or router_tile(E, D)
    logits = torch.empty((1, E), dtype=x.dtype, device=x.device)
    ids = torch.empty((1, K), dtype=torch.int64, device=x.device)
    w = torch.empty((1, K), dtype=torch.float32, device=x.device)
    h, delta, nw, eps, h2 = norm if norm is not None else (x, x, x, 0.0, x)  # placeholders, never read
    _ROUTER[(triton.cdiv(E, br),)](x, router, logits, ids, w, counter, E, D, router.stride(0), h, delta, nw, h2,
                                   eps, K=K, K_P=triton.next_power_of_2(K), BLOCK_R=br, BLOCK_D=bd,
                                   BLOCK_E=triton.next_power_of_2(E), NORM=bool(norm_topk), FUSE=bool(fuse),
                                   NORM_IN=norm is not None, W32=nw.dtype == torch.float32 and norm is not None,
                                   num_warps=warps, **launch_args(x.device))
    if not fuse and not defer:
        ids, w = softmax_topk(logits, K, norm_topk, lookup)
    return logits, ids, w


def _softmax_topk_kernel(LOGITS, IDS, W, E, s_l, SLOT_OF, base, SLOTS, BAD, HOST_ROW, SRC, COUNTS, K: tl.constexpr,
                         K_P: tl.constexpr, BLOCK_E: tl.constexpr, NORM: tl.constexpr, LOOKUP: tl.constexpr = False,
                         LOAD: tl.constexpr = False, GDC: tl.constexpr = False):
    gdc_enter(GDC)
    t = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK_E)
    x = tl.load(LOGITS + t * s_l + o, mask=o < E, other=float("-inf")).to(tl.float32)
    idx = _topk_store(x, E, IDS + t * K, W + t * K, K, K_P, BLOCK_E, NORM)
    if LOOKUP:  # (one token) a complete slot table's slots of the chosen experts (slot_table.lookup's contract)
        ko = tl.arange(0, K_P)
        km = ko < K
        key = base + idx.to(tl.int64)
        s = tl.load(SLOT_OF + key, mask=km, other=0).to(tl.int64)
        if LOAD:  # a plan of every key in flight: a planned key loads into its reserved slot (slot_table.lookup)
            planned = km & (s <= -2)
            s = tl.where(planned, -2 - s, s)
            tl.store(SLOT_OF + key, s.to(tl.int32), mask=planned)
            tl.store(SRC + ko, tl.where(planned, tl.load(HOST_ROW + key, mask=planned, other=-1), -1), mask=km)
            tl.store(COUNTS, tl.load(COUNTS) + tl.sum((km & (s >= 0) & ~planned).to(tl.int64), axis=0))
            tl.store(COUNTS + 1, tl.load(COUNTS + 1) + tl.sum(planned.to(tl.int64), axis=0))
        worst = tl.max(tl.where(km & (s < 0), key + 1, 0), axis=0)
        tl.store(BAD, tl.maximum(tl.load(BAD), worst))
        tl.store(SLOTS + ko, tl.where(s < 0, 0, s), mask=km)


def _topk_store_fn(x, E, IDS, W, K: tl.constexpr, K_P: tl.constexpr, BLOCK_E: tl.constexpr, NORM: tl.constexpr):
    """fp32 logits x [BLOCK_E] (-inf past E) -> one token's K ids (int64) and weights (fp32) at IDS, W; returns the
    ids (int32 [K_P], entries past K 0)."""
    o = tl.arange(0, BLOCK_E)
    m = o < E
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
    tl.store(IDS + ko, idx.to(tl.int64), mask=km)
    tl.store(W + ko, vals, mask=km)
    return idx


def _x_chunk_fn(X, H, DELTA, NW, HOUT, o, m, rstd, lim, NORM_IN: tl.constexpr, W32: tl.constexpr):
    """x[o] in fp32: loaded, or (NORM_IN) the norm of round(h + delta) at o computed here (fused_norm's roundings),
    stored with h' where o < lim (D in the first program, 0 in the others)."""
    if NORM_IN:
        dt = HOUT.dtype.element_ty
        hv = _round_to(tl.load(H + o, mask=m, other=0.0).to(tl.float32)
                       + tl.load(DELTA + o, mask=m, other=0.0).to(tl.float32), dt)
        n = hv.to(tl.float32) * rstd
        w = tl.load(NW + o, mask=m, other=0.0).to(tl.float32)
        if W32:
            y = n * w
        else:
            y = _round_to(n, dt).to(tl.float32) * w
        xv = _round_to(y, dt)
        tl.store(HOUT + o, hv, mask=o < lim)
        tl.store(X + o, xv, mask=o < lim)
        return xv.to(tl.float32)
    else:
        return tl.load(X + o, mask=m, other=0.0).to(tl.float32)


def _router_kernel(X, R, LOGITS, IDS, W, COUNTER, E, D, s_r, H, DELTA, NW, HOUT, eps, K: tl.constexpr,
                   K_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
                   NORM: tl.constexpr, FUSE: tl.constexpr, NORM_IN: tl.constexpr, W32: tl.constexpr,
                   GDC: tl.constexpr = False):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < E
    od = tl.arange(0, BLOCK_D)
    rp = R + rows.to(tl.int64)[:, None] * s_r
    w0 = tl.load(rp + od[None, :], mask=mr[:, None] & (od[None, :] < D), other=0.0)  # static: before the wait
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    rstd = 0.0
    if NORM_IN:  # the sum of squares of h' = round(h + delta) over the whole row first
        ss = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o = d0 + od
            m = o < D
            hv = _round_to(tl.load(H + o, mask=m, other=0.0).to(tl.float32)
                           + tl.load(DELTA + o, mask=m, other=0.0).to(tl.float32), HOUT.dtype.element_ty)
            hf = hv.to(tl.float32)
            ss += hf * hf
        rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / D + eps)
    lim = D * (pid == 0).to(tl.int32)  # the first program writes h' and x
    acc = w0.to(tl.float32) * _x_chunk(X, H, DELTA, NW, HOUT, od, od < D, rstd, lim, NORM_IN, W32)[None, :]
    for d0 in range(BLOCK_D, D, BLOCK_D):
        o = d0 + od
        m = o < D
        wv = tl.load(rp + o[None, :], mask=mr[:, None] & m[None, :], other=0.0)
        acc += wv.to(tl.float32) * _x_chunk(X, H, DELTA, NW, HOUT, o, m, rstd, lim, NORM_IN, W32)[None, :]
    tl.store(LOGITS + rows, _round_to(tl.sum(acc, axis=1), LOGITS.dtype.element_ty), mask=mr)
    if FUSE:
        tl.debug_barrier()  # every thread's logits stored before the count (its release orders them)
        done = tl.atomic_add(COUNTER, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:  # the last program: every other program's logits are visible
            o = tl.arange(0, BLOCK_E)
            x = tl.load(LOGITS + o, mask=o < E, other=float("-inf"), volatile=True).to(tl.float32)
            _topk_store(x, E, IDS, W, K, K_P, BLOCK_E, NORM)
            tl.store(COUNTER, 0)


_SOFTMAX_TOPK = _ROUTER = _topk_store = _x_chunk = None
if triton is not None:
    _topk_store = triton.jit(_topk_store_fn)
    _x_chunk = triton.jit(_x_chunk_fn)
    _SOFTMAX_TOPK = triton.jit(_softmax_topk_kernel)
    _ROUTER = triton.jit(_router_kernel)
