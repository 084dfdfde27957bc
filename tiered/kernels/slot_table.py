"""Device-side expert slot resolution and miss copies: what lets an offloaded decode step run as one CUDA graph.

Owns two kernels and their plain torch references (the references are the CPU path and what tests compare with):
  - `resolve`: one layer's top-k ids -> slot rows, on the device. Hits are looked up in a key -> slot table;
    each miss takes the slot with the lowest eviction score (score = uses * w + last use tick: w = 0 is LRU, w > 0
    frequency-weighted LRU, the host's `flru`; or, given per-key predicted next uses `nt`, minus the slot key's nt:
    the block predicted to be needed last goes first), never a slot this call already uses; free slots go first. The
    tables, the clock and the hit/miss counters are updated in place, and each miss's source row in the host pool
    is written out for `gather`.
  - `gather`: copy whole expert blocks from a host pool (page-locked memory the GPU reads over UVA) into the slots
    resolve chose, one program per (expert, chunk); rows without a miss exit at once. A miss resolve split with
    the CPU (--cpu-split auto) goes to the split row without the CPU's FFN rows (`split_spec`: their gate and up
    rows zeroed, not read; their down columns left). The copy engine cannot be
    driven from inside a graph with data-dependent addresses; measured on the H200 box this kernel reads pinned
    host memory at 49-50 GB/s for 4-10 blocks of 2.6-9.4 MB, against 51-54 GB/s for cudaMemcpyAsync
    (benchmarks/results/uva-probe-2026-11-30-h200.json).
  - `fill_pick` / `fill_install`: the device step's background fill (--device-fill). pick reserves free slots
    for keys that are not resident (key_of = -2 - key: resolve neither takes nor evicts a reserved slot) and
    writes their host rows for `gather`, which copies them on a side stream beside the step; install gives each
    slot its key afterwards, or frees it when a demand miss loaded that key meanwhile.
  - `fill_land`: the copy-engine fill's install (store/copyfill.py): cudaMemcpyAsync on a side stream, outside the
    graph, copies a plan made on the host at the decode's start into reserved slots; each step's first kernel
    enters what has landed. A demand miss on a planned key is copied into its reserved slot (the same bytes the
    copy engine writes there), so it evicts nothing.
  - `lookup`: once the copy fill has made every MoE key resident (a budget that holds them all), the step needs no
    resolve or gather: ids -> slots, nothing else (decode/devstep.py's complete graphs).
Measured and not kept: both in one launch (program 0 resolves and raises a flag the others wait on before they
copy; session 9, benchmarks/results/offload-devstep-2026-12-01-h200-s9.json). With an exit counter (528 atomics on
one address a call) the warm q4 step took 524.5 us against 500.6 for the two kernels; with the step's generation as
the flag (no atomics but the release), 518.2 against 500.1 in the same call. The waiting programs' polling costs more
than the launch it saves: with programmatic dependent launch, gather's launch already overlaps resolve.
Does not own: the tensors (store/devtable.py allocates and syncs them with the host tables), nor the step that
calls these (decode/devstep.py).

Legend: K top-k, S device slots, N keys = L * E, B block bytes, R host pool rows.
Tables: slot_of int32 [N] (-1 = not resident; <= -2: the copy-engine fill copies the key into slot -2 - slot_of),
key_of int32 [S] (-1 = free, <= -2 = reserved by a fill whose copy is in flight: within one step for the gather
fill, until `fill_land` for the copy-engine fill), last int64 [S], uses int64 [S],
clock int64 [1] (ticks once per resolve, like the host cache's get() clock), counts int64 [7] (hits, misses;
prefetch: already resident, loaded; misses computed on the CPU; misses split by rows with it, and their CPU rows;
a table of 5 serves every call without a row split),
host_row int64 [N] (the key's row in the host pool; every key must have one).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from tiered.kernels.fused_route import _topk_store, softmax_topk
from tiered.kernels.pdl import gdc_enter, launch_args

SPLIT_BASE = 1 << 16  # a split miss's cpu_row: -2 - (RAM row * SPLIT_BASE + the FFN rows the CPU computes)


def split_granule(F: int) -> int:
    """A split's FFN rows are a multiple of this: F / 32, even (a down row's skipped columns are whole 4-byte
    words in every dtype the split takes; 24 rows of the 10.6B shape's 768)."""
    return max(2, F // 32 // 2 * 2)


FREE_SCORE = -(2 ** 62)  # a free slot's score: taken before any resident expert is evicted
PINNED_SCORE = 2 ** 62  # a slot this call uses: never a victim
_SPLIT_BASE = tl.constexpr(SPLIT_BASE)
_FREE = tl.constexpr(FREE_SCORE)  # (Triton reads globals only when they are constexpr instances)
_PINNED = tl.constexpr(PINNED_SCORE)


@triton.jit
def _resolve_kernel(ids_ptr, base, slot_of, key_of, last, uses, clock, counts, host_row, out_slot, out_src,
                    pin_ptr, nt_ptr, n_ids, n_slots, n_pin, w, margin, K_P: tl.constexpr, S_P: tl.constexpr,
                    P_P: tl.constexpr, PREFETCH: tl.constexpr, SCORED: tl.constexpr, GDC: tl.constexpr = False,
                    cpu_take=None, cpu_row=None, zero_slot=0, CPU: tl.constexpr = False, cpu_split=None,
                    split_slot=0, split_c=None, SPLIT: tl.constexpr = False, ADMIT: tl.constexpr = False,
                    logits=None, top_ids=None, top_w=None, n_logits=0, TOPK: tl.constexpr = False,
                    TK: tl.constexpr = 1, NORM_TOPK: tl.constexpr = False, BLOCK_E: tl.constexpr = 2):
    gdc_enter(GDC)
    if TOPK:  # the router's softmax-top-k first (fused_route's rule, one launch less a layer): ids and weights
        # stored where the model's Routed holds them, then read back by every thread (ids_ptr is top_ids, or an
        # override's row that replaces them)
        oe = tl.arange(0, BLOCK_E)
        xl = tl.load(logits + oe, mask=oe < n_logits, other=float("-inf")).to(tl.float32)
        _topk_store(xl, n_logits, top_ids, top_w, TK, K_P, BLOCK_E, NORM_TOPK)
        tl.debug_barrier()  # the block's stores visible to all its threads before the ids are loaded
    ok = tl.arange(0, K_P)
    inb = ok < n_ids
    raw = tl.load(ids_ptr + ok, mask=inb, other=-1).to(tl.int64)
    mk = inb & (raw >= 0)  # an id < 0 is a skipped entry (a prefetch candidate dropped by the caller)
    keys = base + tl.where(mk, raw, 0)  # [K_P]
    # [K_P] current slot; -1 = miss; <= -2: a miss whose slot -2 - s the copy-engine fill reserved (its copy in
    # flight): the miss is loaded there, evicting nothing
    s = tl.load(slot_of + keys, mask=mk, other=-1).to(tl.int64)
    hit = mk & (s >= 0)
    miss = mk & (s < 0)
    t = tl.load(clock) + 1
    c0 = 2 if PREFETCH else 0
    tl.store(counts + c0, tl.load(counts + c0) + tl.sum(hit.to(tl.int64), axis=0))
    if not PREFETCH:  # a demand call touches its hits (a prefetch does not: only a use counts as one)
        sh = tl.where(hit, s, 0)
        tl.store(uses + sh, tl.load(uses + sh, mask=hit, other=0) + 1, mask=hit)
        tl.store(last + sh, tl.zeros([K_P], dtype=tl.int64) + t, mask=hit)
        tl.store(clock, t)
    if CPU:
        tl.store(cpu_row + ok, tl.full([K_P], -1, tl.int64), mask=inb)
    if tl.sum(miss.to(tl.int32), axis=0) == 0:  # every expert resident: no victim search (the common case)
        tl.store(out_slot + ok, tl.where(mk, s, -1), mask=inb)
        tl.store(out_src + ok, tl.full([K_P], -1, tl.int64), mask=inb)
        if SPLIT:  # no split: rows 0, no slot, no RAM row
            tl.store(split_c, 0)
            tl.store(split_c + 1, -1)
            tl.store(split_c + 2, -1)
    else:
        on_cpu = miss & (ok < 0)
        split = miss & (ok < 0)
        sr = 0
        if CPU:  # the first cpu_take[misses] misses in order of latest predicted next use (by position without nt)
            c = tl.load(cpu_take + tl.sum(miss.to(tl.int32), axis=0))
            if SCORED:
                pri = tl.load(nt_ptr + keys, mask=mk, other=0)
            else:
                pri = ok.to(tl.int64) * 0
            ahead = (pri[None, :] > pri[:, None]) | ((pri[None, :] == pri[:, None]) & (ok[None, :] > ok[:, None]))
            rank = tl.sum((ahead & miss[None, :]).to(tl.int32), axis=1)  # [K_P] misses before each
            on_cpu = miss & (rank < c)
            if SPLIT:  # the next miss in that order is split by rows: the CPU computes its first sr FFN rows
                sr = tl.load(cpu_split + tl.sum(miss.to(tl.int32), axis=0)).to(tl.int64)
                split = miss & (rank == c) & ((rank.to(tl.int64) * 0 + sr) > 0)  # (full shape: the interpreter)
            miss = miss & (rank >= c)
            if SPLIT and not ADMIT:  # the split row, outside the table; ADMIT: a slot of its own, as a copy
                miss = miss & (split == 0)
        os_ = tl.arange(0, S_P)
        ms = os_ < n_slots
        kof = tl.load(key_of + os_, mask=ms, other=-1)
        # the hits (read before this call's touch above; pinned, so their scores are not used) are never victims
        # of this call, nor are the extra pinned slots (a prefetch: the slots the layer being computed reads)
        pin = os_ < 0
        for k in tl.static_range(K_P):
            sk = tl.sum(tl.where((ok == k) & hit, s, 0), axis=0)
            hk = tl.sum(tl.where((ok == k) & hit, 1, 0), axis=0) > 0
            pin = pin | ((os_ == sk) & hk)
        for p in tl.static_range(P_P):
            sp = tl.load(pin_ptr + p, mask=p < n_pin, other=-1)
            pin = pin | (os_ == sp)
        if SCORED:  # evict the latest predicted next use (nt: larger = later)
            score = -tl.load(nt_ptr + kof.to(tl.int64), mask=ms & (kof >= 0), other=0)
            nt_k = tl.load(nt_ptr + keys, mask=mk, other=0)  # [K_P] the candidates' own predicted next use
        else:
            score = tl.load(uses + os_, mask=ms, other=0) * w + tl.load(last + os_, mask=ms, other=0)
        score = tl.where(kof == -1, _FREE, score)
        score = tl.where(pin | (os_ >= n_slots) | (kof < -1), _PINNED, score)  # < -1: a fill copy in flight
        planned = miss & (s < -1)  # its slot is the copy fill's reservation (key_of stays -2 - key: pinned until
        # the fill's copy lands, since that copy writes the same bytes into it)
        slot = tl.where(planned, -2 - s, s)
        for k in tl.static_range(K_P):
            mk_k = tl.sum(tl.where((ok == k) & miss & (planned == 0), 1, 0), axis=0) > 0
            v = tl.argmin(score, axis=0).to(tl.int64)
            lo = tl.min(score, axis=0)
            ok_v = lo < _PINNED  # a slot is left to take (a prefetch may run out; demand never does)
            if SCORED and PREFETCH:  # a prefetch never evicts a block predicted to be needed before its candidate
                ntc = tl.sum(tl.where(ok == k, nt_k, 0), axis=0)
                ok_v = ok_v & ((lo == _FREE) | (-lo >= ntc + margin))
            score = tl.where((os_ == v) & mk_k & ok_v, _PINNED, score)
            slot = tl.where((ok == k) & mk_k & ok_v, v, slot)
        load = miss & (slot >= 0)
        # evict the victims' keys, then install the misses (distinct addresses: a victim is never a key of this
        # call); a claimed slot is used now (a demand miss) or enters cold (a prefetch: the first victim unless used)
        old = tl.load(key_of + slot, mask=load, other=-1).to(tl.int64)
        tl.store(slot_of + old, -1, mask=load & (old >= 0))
        if ADMIT:  # the admitted split's slot is reserved (key_of -2 - key: neither found nor evicted) until the
            # step's end, when its later copy has landed (`split_install`)
            tl.store(slot_of + keys, slot.to(tl.int32), mask=load & (split == 0))
            tl.store(key_of + slot, tl.where(split, -2 - keys, keys).to(tl.int32), mask=load & (planned == 0))
        else:
            tl.store(slot_of + keys, slot.to(tl.int32), mask=load)
            tl.store(key_of + slot, keys.to(tl.int32), mask=load & (planned == 0))
        tl.store(last + slot, tl.zeros([K_P], dtype=tl.int64) + (0 if PREFETCH else t), mask=load)
        tl.store(uses + slot, tl.zeros([K_P], dtype=tl.int64) + (0 if PREFETCH else 1), mask=load)
        if ADMIT:
            tl.store(out_slot + ok, tl.where(on_cpu, zero_slot, tl.where(mk, slot, -1)), mask=inb)
        else:
            tl.store(out_slot + ok, tl.where(on_cpu, zero_slot, tl.where(split, split_slot, tl.where(mk, slot, -1))),
                     mask=inb)
        src = tl.load(host_row + keys, mask=load | on_cpu | split, other=-1)
        tl.store(out_src + ok, tl.where(load | split, src, -1), mask=inb)
        n_cpu = tl.sum(on_cpu.to(tl.int64), axis=0)
        n_split = tl.sum(split.to(tl.int64), axis=0)
        n_copy = tl.sum((load & (split == 0)).to(tl.int64), axis=0)  # (ADMIT: the split miss is a load too)
        tl.store(counts + c0 + 1, tl.load(counts + c0 + 1) + n_copy + n_cpu + n_split)
        if SPLIT:  # the call's split: its rows, its slot (the split row, or its own with ADMIT), its RAM row
            tl.store(split_c, tl.where(n_split > 0, sr, 0))
            if ADMIT:
                ss = tl.sum(tl.where(split, slot, 0), axis=0)
            else:
                ss = tl.sum(tl.where(split, split_slot, 0), axis=0)
            tl.store(split_c + 1, tl.where(n_split > 0, ss, -1))
            tl.store(split_c + 2, tl.where(n_split > 0, tl.sum(tl.where(split, src, 0), axis=0), -1))
        if CPU:
            tl.store(cpu_row + ok, tl.where(on_cpu, src, tl.where(split, -2 - src * _SPLIT_BASE - sr, -1)), mask=inb)
            tl.store(counts + 4, tl.load(counts + 4) + n_cpu)
            if SPLIT:
                tl.store(counts + 5, tl.load(counts + 5) + n_split)
                tl.store(counts + 6, tl.load(counts + 6) + n_split * sr)


@triton.jit
def _ld_hint(ptrs, HINT: tl.constexpr):
    """Four int32 words at each 16-byte-aligned pointer by inline PTX (CUDA only; the interpreter has no PTX):
    HINT 1 ld.global.L2::256B, 2 ld.global.nc.L1::no_allocate.L2::256B (the gather's `hint`)."""
    if HINT == 1:
        return tl.inline_asm_elementwise("ld.global.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l",
                                         [ptrs], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                         pack=1)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.L1::no_allocate.L2::256B.v4.b32 {$0, $1, $2, $3}, [$4];",
                                         "=r,=r,=r,=r,l", [ptrs], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                                         is_pure=True, pack=1)


@triton.jit
def _copy_chunk(src, row_src, row_dst, dst, row_words, r, c, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                spec=None, split_c=None, SPLIT: tl.constexpr = False, INVERSE: tl.constexpr = False,
                HINT: tl.constexpr = 0):
    """Chunk c (CHUNKS * BLOCK words) of row r: dst[row_dst[r]] <- src[row_src[r]] when row_src[r] >= 0.
    SPLIT: a row whose destination is the call's split slot (split_c [rows, slot, RAM row]; spec: `split_spec`)
    skips the first split_c[0] FFN rows: zeros for gate's and up's (not read), and down's columns left as they are
    (the zero h rows make them count for nothing). INVERSE: only those rows and columns of that row are copied
    (the rest of the block is in place already; other rows are skipped)."""
    s = tl.load(row_src + r)
    if s >= 0:
        d = tl.load(row_dst + r)
        start = c.to(tl.int64) * (CHUNKS * BLOCK)
        cr = 0
        if SPLIT:
            cr = tl.where(d == tl.load(split_c + 1), tl.load(split_c), 0)
        if cr > 0:  # the split slot's row (a runtime branch: the other rows copy without the masks' arithmetic)
            g, u, rw = tl.load(spec + 1), tl.load(spec + 2), tl.load(spec + 3)
            dd, dw, nd = tl.load(spec + 4), tl.load(spec + 5), tl.load(spec + 6)
            zw = cr * rw  # gate's (and up's) words of the CPU's rows
            cw = (cr * tl.load(spec + 7) // 4).to(tl.int32)  # a down row's words of the CPU's columns
            for i in tl.static_range(CHUNKS):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                m = offs < row_words
                zero = ((offs >= g) & (offs < g + zw)) | ((offs >= u) & (offs < u + zw))
                rel = offs - dd
                inside = (rel >= 0) & (rel < nd)
                keep = inside & (tl.where(inside, rel, 0).to(tl.int32) % dw.to(tl.int32) < cw)
                if INVERSE:
                    sel = m & (zero | keep)
                    tl.store(dst + d * row_words + offs, tl.load(src + s * row_words + offs, mask=sel), mask=sel)
                else:
                    v = tl.load(src + s * row_words + offs, mask=m & (zero == 0) & (keep == 0), other=0)
                    tl.store(dst + d * row_words + offs, v, mask=m & (keep == 0))
        elif not INVERSE:
            for i in tl.static_range(CHUNKS):
                if HINT > 0:  # 16 bytes a load with a 256-byte L2 fetch hint (row_words: a multiple of 4)
                    q = start + i * BLOCK + 4 * tl.arange(0, BLOCK // 4)
                    mq = q < row_words
                    w0, w1, w2, w3 = _ld_hint(src + s * row_words + tl.where(mq, q, 0), HINT)
                    out = dst + d * row_words + q
                    tl.store(out, w0, mask=mq)
                    tl.store(out + 1, w1, mask=mq)
                    tl.store(out + 2, w2, mask=mq)
                    tl.store(out + 3, w3, mask=mq)
                else:
                    offs = start + i * BLOCK + tl.arange(0, BLOCK)
                    m = offs < row_words
                    tl.store(dst + d * row_words + offs, tl.load(src + s * row_words + offs, mask=m), mask=m)


@triton.jit
def _gather_kernel(src, row_src, row_dst, dst, row_words, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                   GDC: tl.constexpr = False, spec=None, split_c=None, SPLIT: tl.constexpr = False,
                   INVERSE: tl.constexpr = False, landed=None, LAND: tl.constexpr = False):
    gdc_enter(GDC)
    _copy_chunk(src, row_src, row_dst, dst, row_words, tl.program_id(0), tl.program_id(1), BLOCK, CHUNKS,
                spec, split_c, SPLIT, INVERSE)
    if LAND:
        _land(row_src, landed, tl.program_id(0))


@triton.jit
def _land(row_src, landed, r):
    """Row r's chunk is copied (a row that copies): every thread's stores of it, then one release of landed[r] += 1
    (the experts' gate_up waits for a row's count to reach its chunks: moe_decode.Landing)."""
    if tl.load(row_src + r) >= 0:
        tl.debug_barrier()
        tl.atomic_add(landed + r, 1, sem="release", scope="gpu")


@triton.jit
def _globaltimer(v):
    """The GPU's nanosecond clock (%globaltimer); v: any int32 value (the asm's operand, unused)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [v], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _gather_strided_kernel(src, row_src, row_dst, dst, row_words, n_items, n_chunks, BLOCK: tl.constexpr,
                           CHUNKS: tl.constexpr, GDC: tl.constexpr = False, ns_per_chunk=0.0, R_P: tl.constexpr = 2,
                           PACED: tl.constexpr = False, spec=None, split_c=None, SPLIT: tl.constexpr = False,
                           INVERSE: tl.constexpr = False, landed=None, LAND: tl.constexpr = False,
                           HINT: tl.constexpr = 0):
    """The gather with a fixed number of programs, each looping over (row, chunk) items: a copy that runs beside
    compute on another stream without taking every SM. PACED (--h2d-gbps, a benchmark's slower link): the copied
    chunk of ordinal n (counting only rows with a copy, in row order) is not done before n * ns_per_chunk
    nanoseconds after the program started, so a launch moves its bytes no faster than the target."""
    gdc_enter(GDC)
    if PACED:
        orr = tl.arange(0, R_P)
        srcs = tl.load(row_src + orr, mask=orr < n_items // n_chunks, other=-1)
        t0 = _globaltimer(orr.to(tl.int32) * 0)
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        r = it // n_chunks
        _copy_chunk(src, row_src, row_dst, dst, row_words, r, it % n_chunks, BLOCK, CHUNKS, spec, split_c, SPLIT,
                    INVERSE, HINT)
        if PACED:
            if tl.load(row_src + r) >= 0:
                before = tl.sum(((orr < r) & (srcs >= 0)).to(tl.int32), axis=0)
                target = ((before * n_chunks + it % n_chunks + 1).to(tl.float32) * ns_per_chunk).to(tl.int64)
                now = tl.max(_globaltimer(orr.to(tl.int32) * 0) - t0, axis=0)
                while now < target:
                    now = tl.max(_globaltimer(orr.to(tl.int32) * 0) - t0, axis=0)
        if LAND:  # (after the pacing: a paced chunk lands when the slower link would have delivered it)
            _land(row_src, landed, r)


@triton.jit
def _tma_copy_item(desc, row_src, row_dst, dst, lines_per_row, it, tiles_per_row, BM: tl.constexpr):
    """Item it of a TMA gather: box it % tiles_per_row of row r = it // tiles_per_row (a [BM, 32] box of the row's
    128-byte lines through desc, over the host pool as [rows * lines_per_row, 32] int32) into shared memory, then
    stored to slot row_dst[r] (the row's last box masked); nothing for a row without a copy."""
    r = it // tiles_per_row
    s = tl.load(row_src + r)
    if s >= 0:
        d = tl.load(row_dst + r)
        t = it % tiles_per_row
        v = desc.load([(s * lines_per_row + t * BM).to(tl.int32), 0])
        lm = t * BM + tl.arange(0, BM)
        offs = (d * lines_per_row + lm)[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(dst + offs, v, mask=(lm < lines_per_row)[:, None])


@triton.jit
def _gather_tma_kernel(desc, row_src, row_dst, dst, lines_per_row, n_items, tiles_per_row, BM: tl.constexpr,
                       GDC: tl.constexpr = False, landed=None, LAND: tl.constexpr = False):
    """The gather through the tensor memory accelerator: desc is a TMA descriptor (made on the host) over the host
    pool's 128-byte lines; programs loop over (row, box) items (`_tma_copy_item`), each raising landed[r] once."""
    gdc_enter(GDC)
    for it in range(tl.program_id(0), n_items, tl.num_programs(0)):
        _tma_copy_item(desc, row_src, row_dst, dst, lines_per_row, it, tiles_per_row, BM)
        if LAND:
            _land(row_src, landed, it // tiles_per_row)


@triton.jit
def _fill_pick_kernel(order, cursor, slot_of, key_of, host_row, out_key, out_slot, out_src, picked, n_keys, n_slots,
                      n_rows, fill_n, keep_free, C_P: tl.constexpr, S_P: tl.constexpr, W_P: tl.constexpr,
                      GDC: tl.constexpr = False):
    """One program: the first fill_n[0] (<= n_rows) non-resident keys of `order` from the cursor on (a window of
    W_P) and as many free slots (lowest first), keeping keep_free free; the slots are reserved (key_of = -2 - key);
    picked[0] counts them."""
    gdc_enter(GDC)
    oc = tl.arange(0, C_P)
    mc = oc < n_rows
    n_fill = tl.minimum(tl.load(fill_n), n_rows).to(tl.int32)
    tl.store(out_key + oc, tl.full([C_P], -1, tl.int64), mask=mc)
    tl.store(out_slot + oc, tl.full([C_P], -1, tl.int64), mask=mc)
    tl.store(out_src + oc, tl.full([C_P], -1, tl.int64), mask=mc)
    os_ = tl.arange(0, S_P)
    kof = tl.load(key_of + os_, mask=os_ < n_slots, other=0)
    free = (os_ < n_slots) & (kof == -1)
    frank = tl.cumsum(free.to(tl.int32), axis=0) - 1
    n_free = tl.sum(free.to(tl.int32), axis=0)
    c0 = tl.load(cursor)
    ow = tl.arange(0, W_P)
    inw = ow < n_keys
    keys = tl.load(order + (c0 + ow) % n_keys, mask=inw, other=0).to(tl.int64)
    nonres = inw & (tl.load(slot_of + keys, mask=inw, other=0) < 0)
    krank = tl.cumsum(nonres.to(tl.int32), axis=0) - 1
    n_non = tl.sum(nonres.to(tl.int32), axis=0)
    take = tl.minimum(tl.minimum(n_non, n_fill), tl.maximum(n_free - keep_free, 0))
    tl.debug_barrier()  # the -1 rows above land before the picks overwrite theirs
    pk = nonres & (krank < take)
    tl.store(out_key + krank, keys, mask=pk)
    tl.store(out_src + krank, tl.load(host_row + keys, mask=pk, other=-1), mask=pk)
    tl.store(out_slot + frank, os_.to(tl.int64), mask=free & (frank < take))
    tl.debug_barrier()  # every row written before each slot is paired with its key
    k = tl.load(out_key + oc, mask=mc, other=-1)
    sl = tl.load(out_slot + oc, mask=mc, other=-1)
    tl.store(key_of + sl, (-2 - k).to(tl.int32), mask=mc & (k >= 0))
    tl.store(picked, tl.load(picked) + take)
    last_pos = tl.max(tl.where(pk, ow, -1), axis=0)
    step = tl.where(take > 0, last_pos + 1, tl.where(n_non == 0, tl.minimum(n_keys, W_P), 0))
    tl.store(cursor, (c0 + step) % n_keys)


@triton.jit
def _fill_install_kernel(fill_key, fill_slot, slot_of, key_of, last, uses, counts, n_fill, C_P: tl.constexpr,
                         GDC: tl.constexpr = False):
    """After the fill's copies: each reserved slot gets its key (entering cold: last use 0, no uses), unless the
    key became resident meanwhile (a demand miss loaded it), which frees the slot again."""
    gdc_enter(GDC)
    oc = tl.arange(0, C_P)
    k = tl.load(fill_key + oc, mask=oc < n_fill, other=-1)
    v = (oc < n_fill) & (k >= 0)
    sl = tl.load(fill_slot + oc, mask=v, other=0)
    ok = v & (tl.load(slot_of + k, mask=v, other=0) < 0)
    tl.store(slot_of + k, sl.to(tl.int32), mask=ok)
    tl.store(key_of + sl, tl.where(ok, k, -1).to(tl.int32), mask=v)
    tl.store(last + sl, tl.zeros([C_P], dtype=tl.int64), mask=ok)
    tl.store(uses + sl, tl.zeros([C_P], dtype=tl.int64), mask=ok)
    tl.store(counts + 3, tl.load(counts + 3) + tl.sum(v.to(tl.int64), axis=0))


@triton.jit
def _fill_land_kernel(plan_key, plan_slot, landed, installed, slot_of, key_of, last, uses, n_plan,
                      C_P: tl.constexpr, GDC: tl.constexpr = False):
    """The copy-engine fill: the plan's entries [installed, landed) have landed (landed is written by the copy
    stream, read volatile): each key not demanded meanwhile (slot_of still -2 - its slot) takes its slot cold (last
    use 0, no uses); one demanded meanwhile is resident there already. Either way its slot becomes evictable."""
    gdc_enter(GDC)
    lo = tl.load(installed)
    hi = tl.minimum(tl.load(landed, volatile=True), n_plan)
    oc = tl.arange(0, C_P)
    for c0 in range(lo, hi, C_P):
        i = c0 + oc
        v = i < hi
        k = tl.load(plan_key + i, mask=v, other=0)
        sl = tl.load(plan_slot + i, mask=v, other=0)
        s = tl.load(slot_of + k, mask=v, other=0).to(tl.int64)
        fresh = v & (s == -2 - sl)
        tl.store(slot_of + k, sl.to(tl.int32), mask=fresh)
        tl.store(last + sl, tl.zeros([C_P], dtype=tl.int64), mask=fresh)
        tl.store(uses + sl, tl.zeros([C_P], dtype=tl.int64), mask=fresh)
        tl.store(key_of + sl, tl.where(fresh | (s == sl), k, -1).to(tl.int32), mask=v)
    tl.store(installed, tl.maximum(hi, lo))


@triton.jit
def _split_install_kernel(split_c, slot_of, key_of, n_rows, R_P: tl.constexpr, GDC: tl.constexpr = False):
    """--cpu-split admit, at the step's end: each layer's admitted split slot (split_c [rows, slot, RAM row] with
    rows > 0), reserved by resolve as key_of = -2 - key, takes its key (its later copy has landed)."""
    gdc_enter(GDC)
    o = tl.arange(0, R_P)
    m = o < n_rows
    rows = tl.load(split_c + o * 3, mask=m, other=0)
    sl = tl.load(split_c + o * 3 + 1, mask=m, other=-1)
    v = m & (rows > 0) & (sl >= 0)
    kof = tl.load(key_of + sl, mask=v, other=-1).to(tl.int64)
    v = v & (kof < -1)
    k = -2 - kof
    tl.store(key_of + sl, k.to(tl.int32), mask=v)
    tl.store(slot_of + k, sl.to(tl.int32), mask=v)


@triton.jit
def _lookup_kernel(ids, s_ids, id_row, out, out_row, base, slot_of, bad, host_row, src, counts, n_rows,
                   K: tl.constexpr, R_P: tl.constexpr, K_P: tl.constexpr, LOAD: tl.constexpr,
                   GDC: tl.constexpr = False):
    """A complete table's lookup: row r's K ids (at ids + id_row[r] * s_ids) -> their slots at out + out_row[r] * K,
    key base[r] + id. No bookkeeping (nothing is evicted while every key is resident). A key found not resident
    (an internal error) reads slot 0 and raises bad[0] to at least key + 1. LOAD (a plan of every key in flight):
    a planned key (slot_of <= -2) is loaded into its reserved slot: slot_of takes it, its RAM row goes to src (-1
    for the others) for the gather, and counts[0] / counts[1] count the hits and loads."""
    gdc_enter(GDC)
    r = tl.arange(0, R_P)[:, None]
    k = tl.arange(0, K_P)[None, :]
    rm = r < n_rows
    m = rm & (k < K)
    ir = tl.load(id_row + r, mask=rm, other=0)
    orow = tl.load(out_row + r, mask=rm, other=0)
    b = tl.load(base + r, mask=rm, other=0)
    key = b + tl.load(ids + ir * s_ids + k, mask=m, other=0)
    s = tl.load(slot_of + key, mask=m, other=0).to(tl.int64)
    if LOAD:
        planned = m & (s <= -2)
        s = tl.where(planned, -2 - s, s)
        tl.store(slot_of + key, s.to(tl.int32), mask=planned)
        row = tl.load(host_row + key, mask=planned, other=-1)
        tl.store(src + orow * K + k, tl.where(planned, row, -1), mask=m)
        tl.store(counts, tl.load(counts) + tl.sum(tl.sum((m & (s >= 0) & ~planned).to(tl.int64), axis=1), axis=0))
        tl.store(counts + 1, tl.load(counts + 1) + tl.sum(tl.sum(planned.to(tl.int64), axis=1), axis=0))
    worst = tl.max(tl.max(tl.where(m & (s < 0), key + 1, 0), axis=1), axis=0)
    tl.store(bad, tl.maximum(tl.load(bad), worst))
    tl.store(out + orow * K + k, tl.where(s < 0, 0, s), mask=m)


class HostPointer:
    """A page-locked host tensor handed to a Triton kernel as a device-readable pointer (UVA): CUDA maps pinned
    memory into the device's address space, so the kernel reads it over PCIe."""

    def __init__(self, t: Tensor) -> None:
        if t.device.type != "cpu" or not t.is_pinned():
            raise ValueError("HostPointer needs a page-locked (pinned) CPU tensor")
        self.t = t
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return self.t.data_ptr()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _p2(n: int) -> int:
    return max(2, triton.next_power_of_2(int(n)))


def resolve(ids: Tensor, layer: int, num_experts: int, t: dict[str, Tensor], w: int, out_slot: Tensor,
            out_src: Tensor, *, pin: Tensor | None = None, prefetch: bool = False, nt: Tensor | None = None,
            margin: int = 0, cpu: tuple | None = None, topk: tuple | None = None) -> None:
    """ids int64 [K] (device) of `layer` -> out_slot int64 [K], out_src int64 [K] (host row of a miss, -1 on a hit);
    `t` holds the tables of the module docstring (updated in place). CUDA: one program; else the reference.
    An id < 0 is skipped (out_slot and out_src -1).

    topk = (logits [E], top_ids int64 [K], top_w fp32 [K], norm_topk) (demand calls): the layer's softmax-top-k
    (fused_route.softmax_topk's rule) runs first in the same program and stores the router's choice into top_ids and
    top_w; `ids` is top_ids itself, or an override's row that replaces that choice (a replayed routing). The router
    kernel left the top-k to this call (fused_route's defer): the step saves a launch a layer, but measured about 2%
    slower on the H200 (session 21), so the device step uses it only with TIERED_TOPK_RESOLVE=1.

    nt: None = evict by score uses * w + last use (LRU, flru). Else int64 [N], each key's predicted next use (larger
    = later, decode/devpolicy.py): the victim is the resident slot whose key has the largest nt.

    prefetch=True: load what is missing without touching what is resident (no use counted, the clock does not
    move), entering cold (last use 0, no uses: with nt None the first victim of the next call unless that call
    uses it; measured on the H200 box, inserting them as the newest evicted useful experts), never evicting a slot
    in `pin` (int64 [P]: the slots compute reads meanwhile); with nt, only a free slot or a victim whose nt is at
    least the candidate's nt + margin is taken (a prefetch never evicts a block predicted to be needed sooner). A
    candidate left without a slot gets -1. Counted in counts[2] (already resident) and counts[3] (loaded).

    cpu = (take int32 [K + 1], cpu_row int64 [K], zero_slot) (demand calls only: CPU experts in the device step):
    of a call's m misses, the first take[m] in order of latest predicted next use (with nt; else the last misses
    in id order) are computed on the CPU: they get no slot and evict nothing, their slot row is zero_slot (an
    all-zero expert that outputs exactly 0) and cpu_row holds their RAM row (-1 elsewhere), for the mailbox
    (kernels/cpu_handoff.py). They count as misses (counts[1]) and in counts[4].
    cpu = (take, cpu_row, zero_slot, split int32 [K + 1], split_slot, split_c int64 [3][, admit]): besides, of m
    misses, the next one in that order (if split[m] > 0) is split by FFN rows: the CPU computes its first split[m]
    rows (its cpu_row is -2 - (RAM row * SPLIT_BASE + split[m])), and its other rows are copied into split_slot (a
    scratch row outside the table: no eviction, no entry; `gather` with the split's spec zeroes the CPU's gate and
    up rows there), or with admit into a slot of its own that it takes as any miss does, reserved (key_of = -2 - key:
    neither found nor evicted) until the step's later copy of the CPU's rows (`gather(..., inverse=True)`) has
    landed and `split_install` enters it. split_c gets [split[m], its slot, its RAM row] when a call splits a
    miss, else [0, -1, -1]. Counted in counts[1], counts[5] (splits) and counts[6] (the FFN rows the CPU
    computed)."""
    S = t["key_of"].shape[0]
    K = ids.shape[0]
    if topk is not None:
        if prefetch:
            raise ValueError("the router's top-k is a demand call's: resolve(prefetch=True) takes no topk")
        lg, tid, tw, _ = topk
        if lg.dim() != 1 or tid.shape != (K,) or tw.shape != (K,) or tid.dtype != torch.int64 or \
                tw.dtype != torch.float32 or lg.stride(0) != 1:
            raise ValueError(f"resolve(topk=...) wants logits [E] contiguous, ids int64 [{K}], weights fp32 [{K}]; "
                             f"got {tuple(lg.shape)} {tuple(tid.shape)} {tid.dtype} {tuple(tw.shape)} {tw.dtype}")
    if ids.device.type != "cuda":
        if topk is not None:  # the rule's own function (the kernel on CUDA or the interpreter, else torch's)
            i_, w_ = softmax_topk(topk[0][None], K, bool(topk[3]))
            topk[1].copy_(i_[0])
            topk[2].copy_(w_[0])
        return resolve_reference(ids, layer, num_experts, t, w, out_slot, out_src, pin=pin, prefetch=prefetch, nt=nt,
                                 margin=margin, cpu=cpu)
    if cpu is not None and prefetch:
        raise ValueError("CPU experts are a demand decision: resolve(prefetch=True) takes no cpu")
    if S < K and not prefetch:
        raise ValueError(f"a device slot table of {S} slots cannot hold one layer's {K} experts")
    nw = resolve_warps() or (4 if S <= 1024 else 8 if S <= 4096 else 16)
    P = 0 if pin is None else pin.shape[0]
    _resolve_kernel[(1,)](ids, layer * num_experts, t["slot_of"], t["key_of"], t["last"], t["uses"], t["clock"],
                          t["counts"], t["host_row"], out_slot, out_src, pin if pin is not None else out_slot,
                          nt if nt is not None else out_slot, K, S, P, int(w), int(margin), K_P=_p2(K), S_P=_p2(S),
                          P_P=_p2(P) if P else 1, PREFETCH=prefetch, SCORED=nt is not None, num_warps=nw,
                          **launch_args(ids.device), **_cpu_args(cpu, out_slot), **_topk_args(topk, K))


def _topk_args(topk: tuple | None, K: int) -> dict:
    """resolve's router top-k arguments (none when off: the kernel's defaults)."""
    if topk is None:
        return {}
    lg, tid, tw, norm = topk
    return {"logits": lg, "top_ids": tid, "top_w": tw, "n_logits": lg.shape[0], "TOPK": True, "TK": int(K),
            "NORM_TOPK": bool(norm), "BLOCK_E": _p2(lg.shape[0])}


def _cpu_args(cpu: tuple | None, dummy: Tensor) -> dict:
    """resolve's CPU-split arguments (a dummy pointer when off: the real compiler wants every argument typed)."""
    off = {"cpu_split": dummy, "split_slot": 0, "split_c": dummy, "SPLIT": False, "ADMIT": False}
    if cpu is None:
        return {"cpu_take": dummy, "cpu_row": dummy, "zero_slot": 0, "CPU": False, **off}
    take, row, zero = cpu[:3]
    if len(cpu) > 3:
        split, split_slot, split_c = cpu[3:6]
        off = {"cpu_split": split, "split_slot": int(split_slot), "split_c": split_c, "SPLIT": True,
               "ADMIT": bool(cpu[6]) if len(cpu) > 6 else False}
    return {"cpu_take": take, "cpu_row": row, "zero_slot": int(zero), "CPU": True, **off}


def resolve_reference(ids: Tensor, layer: int, num_experts: int, t: dict[str, Tensor], w: int, out_slot: Tensor,
                      out_src: Tensor, *, pin: Tensor | None = None, prefetch: bool = False, nt: Tensor | None = None,
                      margin: int = 0, cpu: tuple | None = None) -> None:
    """The same algorithm in plain torch on host values (CPU path and test reference): ties go to the lowest slot,
    as argmin's do in the kernel."""
    slot_of, key_of, last, uses = t["slot_of"], t["key_of"], t["last"], t["uses"]
    S = key_of.shape[0]
    now = int(t["clock"][0]) + 1
    raw = [int(e) for e in ids.tolist()]
    keys = [layer * num_experts + e if e >= 0 else -1 for e in raw]
    slots = [int(slot_of[k]) if k >= 0 else -1 for k in keys]
    pinned = set()
    for s in slots:
        if s >= 0:
            if not prefetch:
                uses[s] += 1
                last[s] = now
            pinned.add(s)
    if pin is not None:
        pinned.update(int(p) for p in pin.tolist() if 0 <= p < S)  # S: the zero slot of a CPU expert
    ntl = nt.tolist() if nt is not None else None
    kof = key_of.tolist()
    if ntl is None:
        score = [FREE_SCORE if kof[i] < 0 else int(uses[i]) * int(w) + int(last[i]) for i in range(S)]
    else:
        score = [FREE_SCORE if kof[i] < 0 else -int(ntl[kof[i]]) for i in range(S)]
    for i in pinned:
        score[i] = PINNED_SCORE
    for i in range(S):
        if kof[i] < -1:  # reserved by a fill whose copy is in flight
            score[i] = PINNED_SCORE
    src = [-1] * len(keys)
    on_cpu: set[int] = set()
    split_j, sr = -1, 0
    if cpu is not None:
        miss = [j for j, k in enumerate(keys) if k >= 0 and slots[j] < 0]
        pri = {j: (int(ntl[keys[j]]) if ntl is not None else 0, j) for j in miss}
        c = int(cpu[0][len(miss)]) if miss else 0
        order = sorted(miss, key=lambda j: pri[j], reverse=True)
        on_cpu = set(order[:c])
        cpu[1].fill_(-1)
        if len(cpu) > 3:
            sr = int(cpu[3][len(miss)])
            if sr > 0 and c < len(order):
                split_j = order[c]
            else:
                sr = 0
    admit = cpu is not None and len(cpu) > 6 and bool(cpu[6])
    for j, k in enumerate(keys):
        if k < 0 or slots[j] >= 0:
            continue
        planned = slots[j] < -1  # the copy fill's reserved slot -2 - slot_of (key_of stays reserved until it lands)
        slots[j] = -1
        if j in on_cpu:
            slots[j] = int(cpu[2])
            cpu[1][j] = int(t["host_row"][k])
            continue
        if j == split_j:
            cpu[1][j] = -2 - int(t["host_row"][k]) * SPLIT_BASE - sr
            if not admit:  # the split row; with admit it takes a slot below, as any miss
                slots[j] = int(cpu[4])
                src[j] = int(t["host_row"][k])
                continue
        if planned and j != split_j:
            v = -2 - int(slot_of[k])
            slot_of[k] = v
            last[v] = 0 if prefetch else now
            uses[v] = 0 if prefetch else 1
            slots[j] = v
            src[j] = int(t["host_row"][k])
            continue
        v = min(range(S), key=lambda i: (score[i], i))
        if score[v] >= PINNED_SCORE:  # no slot left (a prefetch may run out)
            continue
        if ntl is not None and prefetch and score[v] != FREE_SCORE and -score[v] < int(ntl[k]) + int(margin):
            continue  # the victim is predicted to be needed before this candidate
        score[v] = PINNED_SCORE
        old = int(key_of[v])
        if old >= 0:
            slot_of[old] = -1
        if admit and j == split_j:  # reserved until the step's end (split_install)
            key_of[v] = -2 - k
        else:
            slot_of[k] = v
            key_of[v] = k
        last[v] = 0 if prefetch else now
        uses[v] = 0 if prefetch else 1
        slots[j] = v
        src[j] = int(t["host_row"][k])
    if not prefetch:
        t["clock"][0] = now
    n_load = sum(1 for s in src if s >= 0)
    n_hit = sum(1 for k, s in zip(keys, slots) if s >= 0) - n_load - len(on_cpu)
    c0 = 2 if prefetch else 0
    t["counts"][c0] += n_hit
    t["counts"][c0 + 1] += n_load + len(on_cpu)
    if on_cpu:
        t["counts"][4] += len(on_cpu)
    if split_j >= 0:
        t["counts"][5] += 1
        t["counts"][6] += sr
    if cpu is not None and len(cpu) > 3:
        cpu[5].copy_(torch.tensor([sr, slots[split_j], src[split_j]] if split_j >= 0 else [0, -1, -1]))
    out_slot.copy_(torch.tensor(slots, dtype=torch.int64))
    out_src.copy_(torch.tensor(src, dtype=torch.int64))


def gather(host_pool: Tensor, row_src: Tensor, row_dst: Tensor, slots: Tensor, *, chunks: int = 4,
           ctas: int | None = None, gbps: float = 0.0, split: tuple[Tensor, Tensor] | None = None,
           inverse: bool = False, warps: int = 4, block: int = 1024, landed: Tensor | None = None,
           tma: int = 0, hint: int = 0) -> None:
    """slots[row_dst[r]] = host_pool[row_src[r]] for every r with row_src[r] >= 0 (whole blocks).

    host_pool uint8 [R, B] (pinned on CUDA), slots uint8 [S, B] on the device, row_src / row_dst int64 [K] on the
    device. B must be a multiple of 4 (blocks are 4 KiB aligned). ctas: that many programs looping over the
    (row, chunk) items; None = 4 per SM; 0 = one program per item.
    Measured on the H200 (benchmarks/results/slot-table-2026-12-01-h200-s8.json): when every row hits (most
    layers), 4 per SM take 1.4 / 2.1 us at the q4 / bf16 block sizes against 1.9 / 6.3 for a program per item,
    and copy at the same 49-51 GB/s.
    gbps > 0 (CUDA): paced to that many GB/s (10^9 B/s), a benchmark's emulation of a slower link (--h2d-gbps):
    the strided kernel holds each copied chunk until its share of the launch's time has passed (not measured on
    the GPU yet: DeviceSlotTable.measure_pace reports the rate reached).
    split = (spec int64 [8] from `split_spec`, split_c int64 [3] from resolve, both on the device): the row copied
    into the call's split slot split_c[1] skips the first split_c[0] FFN rows of its expert (zero rows: a whole
    block). A paced gather paces such a row as a whole block. inverse (with split): copy only those rows of that
    row, nothing else (the admitted split's later copy). warps, block: each program's warps and the words of one
    load (`chunks` of them per item): the strided copy's footprint beside compute (the fill's copy: TIERED_FILL_GATHER,
    `fill_gather_options`; session 20 on the H200 found the defaults best for the fill).
    landed (int32 [K] on the device, zero before the call): each copied row's count of landed chunks, raised with
    release semantics after each chunk's stores (`row_chunks` of them make a row), for a consumer that follows the
    gather without waiting for it and waits for its rows only (moe_decode.Landing: the hit experts compute while
    the misses copy). Not with split.
    tma > 0 (CUDA, not paced, no split): the rows are read through the tensor memory accelerator in boxes of tma
    128-byte lines (`_gather_tma_kernel`; a power of two, 8..256), `warps` warps a program; landed then counts boxes
    (`row_chunks(B, tma=tma)`). Elsewhere tma is ignored (the same bytes by the other paths).
    hint (CUDA, the looping programs' whole rows): 1 reads with ld.global.L2::256B, 2 with ld.global.nc.L1::no_allocate
    .L2::256B (16 bytes a load, a 256-byte L2 fetch hint: `GATHER_HINTS`); 0 plain loads."""
    B = slots.shape[1]
    if block < 32 or block & (block - 1) or warps not in (1, 2, 4, 8, 16, 32) or hint not in (0, 1, 2):
        raise ValueError(f"gather: block {block} must be a power of two >= 32, warps {warps} one of 1..32 and hint "
                         f"{hint} 0, 1 or 2")
    if landed is not None and (split is not None or landed.dtype != torch.int32 or landed.shape != row_src.shape
                               or landed.device != slots.device):
        raise ValueError(f"gather(landed=...) wants int32 {tuple(row_src.shape)} on {slots.device} and no split; "
                         f"got {landed.dtype} {tuple(landed.shape)} on {landed.device}"
                         + (" with a split" if split is not None else ""))
    if slots.device.type != "cuda":
        for r, (s, d) in enumerate(zip(row_src.tolist(), row_dst.tolist())):
            if s >= 0:
                if split is not None and d == int(split[1][1]) and int(split[1][0]) > 0:
                    split_copy_reference(host_pool[s], slots[d], split[0], int(split[1][0]), inverse=inverse)
                elif not inverse:
                    slots[d].copy_(host_pool[s])
                if landed is not None:
                    landed[r] += row_chunks(B, block, chunks, tma=tma if split is None and gbps <= 0 else 0)
        return
    if B % 4:
        raise ValueError(f"gather copies 4-byte words: block size {B} is not a multiple of 4")
    words = B // 4
    BLOCK = int(block)
    n_c = triton.cdiv(words, BLOCK * chunks)
    src = HostPointer(host_pool.view(torch.int32)) if host_pool.device.type == "cpu" else host_pool.view(torch.int32)
    if ctas is None:
        ctas = 4 * _sm_count(slots.device)
    if tma and split is None and gbps <= 0:
        _gather_tma(src, host_pool.shape, row_src, row_dst, slots, ctas=ctas, warps=warps, bm=tma, landed=landed)
        return
    if inverse and split is None:
        raise ValueError("gather(inverse=True) copies a split's CPU rows: it needs split=")
    sp = ({"spec": split[0], "split_c": split[1], "SPLIT": True, "INVERSE": bool(inverse)} if split is not None else
          {"spec": row_src, "split_c": row_src, "SPLIT": False, "INVERSE": False})  # every argument typed
    sp.update({"landed": landed, "LAND": True} if landed is not None else {"landed": row_src, "LAND": False})
    if ctas == 0 and gbps <= 0:
        _gather_kernel[(row_src.shape[0], n_c)](src, row_src, row_dst, slots.view(torch.int32), words,
                                                BLOCK=BLOCK, CHUNKS=chunks, num_warps=warps,
                                                **launch_args(slots.device), **sp)
    else:
        n = row_src.shape[0] * n_c
        pace = {"ns_per_chunk": 0.0, "R_P": 2, "PACED": False}  # every argument typed (the real compiler)
        if gbps > 0:
            pace = {"ns_per_chunk": BLOCK * chunks * 4 / float(gbps), "R_P": _p2(row_src.shape[0]), "PACED": True}
            ctas = ctas or 4 * _sm_count(slots.device)
        _gather_strided_kernel[(max(1, min(ctas, n)),)](src, row_src, row_dst, slots.view(torch.int32), words, n, n_c,
                                                        BLOCK=BLOCK, CHUNKS=chunks, num_warps=warps,
                                                        HINT=int(hint), **launch_args(slots.device), **pace, **sp)


def _gather_tma(src: Any, pool_shape: torch.Size, row_src: Tensor, row_dst: Tensor, slots: Tensor, *, ctas: int,
                warps: int, bm: int, landed: Tensor | None) -> None:
    """`gather`'s TMA path (CUDA): a descriptor over the pool's 128-byte lines (src: the pool as int32, a HostPointer
    when pinned), boxes of bm."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    R, B = pool_shape
    lines = B // 128
    if bm < 8 or bm > 256 or bm & (bm - 1) or B % 128 or R * lines >= 2 ** 31:
        raise ValueError(f"gather(tma={bm}): boxes of 8..256 lines (a power of two) over rows of whole 128-byte "
                         f"lines, fewer than 2**31 lines in all; the pool is {R} rows of {B} bytes")
    desc = TensorDescriptor(src, [R * lines, 32], [32, 1], [bm, 32])
    tiles = triton.cdiv(lines, bm)
    n = row_src.shape[0] * tiles
    land = {"landed": landed, "LAND": True} if landed is not None else {"landed": row_src, "LAND": False}
    _gather_tma_kernel[(max(1, min(ctas, n)),)](desc, row_src, row_dst, slots.view(torch.int32), lines, n, tiles,
                                                BM=bm, num_warps=warps, **launch_args(slots.device), **land)


def row_chunks(block_bytes: int, block: int = 1024, chunks: int = 4, tma: int = 0) -> int:
    """The chunks `gather` copies one row of block_bytes in (its (row, chunk) items; landed's count at a whole row)
    with that copy shape (block words a load, chunks loads an item; tma > 0: boxes of tma 128-byte lines)."""
    if tma:
        return triton.cdiv(block_bytes // 128, tma)
    return triton.cdiv(block_bytes // 4, block * chunks)


def split_spec(pool: Tensor, W: Any) -> list[int] | None:
    """The split slot's copy mask for expert views W (gate, up [S, F, D], down [S, D, F], plain tensors of one
    dtype, views of `pool` uint8 [S, B] with B a row's bytes) as int64 words: [split slot (filled by the caller),
    gate's offset, up's offset, words per gate row, down's offset, words per down row, down's words, bytes per
    element]; None when the views are not such (quantized or biased experts: no row split)."""
    mats = [getattr(W, n, None) for n in ("gate", "up", "down")]
    if getattr(W, "gate_bias", None) is not None or not all(isinstance(m, Tensor) and m.dim() == 3 for m in mats):
        return None
    g, u, dn = mats
    F, D = g.shape[1:]
    esz = g.element_size()
    B = pool.shape[1]
    if (any(m.dtype != g.dtype for m in mats) or tuple(u.shape[1:]) != (F, D) or tuple(dn.shape[1:]) != (D, F)
            or any(m.stride(0) * esz != B or not m[0].is_contiguous() for m in mats) or B % 4
            or (D * esz) % 4 or (F * esz) % 4 or F < 2 * split_granule(F)):
        return None
    base = pool.data_ptr()
    off = [m.data_ptr() - base for m in mats]
    if any(o % 4 or o < 0 or o >= B for o in off):
        return None
    return [-1, off[0] // 4, off[1] // 4, D * esz // 4, off[2] // 4, F * esz // 4, D * F * esz // 4, esz]


def split_copy_reference(src: Tensor, dst: Tensor, spec: Tensor, rows: int, *, inverse: bool = False) -> None:
    """One block's split copy in plain torch (uint8 [B] each): as _copy_chunk with SPLIT (and INVERSE)."""
    _, g, u, rw, d, dw, nd, esz = (int(v) for v in spec.tolist())
    s32, d32 = src.view(torch.int32), dst.view(torch.int32)
    cw = rows * esz // 4
    if inverse:  # only the CPU's rows: gate's and up's first rows, down's first columns
        d32[g:g + rows * rw] = s32[g:g + rows * rw]
        d32[u:u + rows * rw] = s32[u:u + rows * rw]
        d32[d:d + nd].view(-1, dw)[:, :cw] = s32[d:d + nd].view(-1, dw)[:, :cw]
        return
    keep = d32[d:d + nd].view(-1, dw)[:, :cw].clone()
    d32.copy_(s32)
    d32[g:g + rows * rw] = 0
    d32[u:u + rows * rw] = 0
    d32[d:d + nd].view(-1, dw)[:, :cw] = keep


FILL_WINDOW = 1024  # keys of the fill order one pick scans


FILL_GATHER_ENV = "TIERED_FILL_GATHER"  # benchmarks: the fill copy's warps:block:chunks


GATHER_HINTS = {"l2_256": 1, "nc_256": 2}  # gather's hint by name: the loads' 256-byte L2 fetch hint (and .nc)


def gather_shape_options(env: str) -> dict:
    """A gather's copy shape, warps:block:chunks[:hint] (each program's warps, the words of one load, loads per item,
    and a load hint of GATHER_HINTS), or tma:BM[:warps] (the tensor memory accelerator's boxes of BM 128-byte lines,
    `gather`'s tma), from the environment variable `env` (a benchmark's knob); unset: gather's defaults (4 warps,
    1,024-word loads, 4 per item, plain loads)."""
    v = os.environ.get(env, "").strip()
    if not v:
        return {}
    if v.startswith("tma:"):
        try:
            bm, *w = (int(x) for x in v[4:].split(":"))
        except ValueError:
            raise ValueError(f"{env}={v!r}: expected tma:BM or tma:BM:warps, e.g. tma:128") from None
        warps = w[0] if w else 4
        if len(w) > 1 or not 8 <= bm <= 256 or bm & (bm - 1) or warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"{env}={v!r}: BM a power of two 8..256, warps one of 1..32 (a power of two)")
        return {"tma": bm, "warps": warps}
    parts = v.split(":")
    hint = GATHER_HINTS.get(parts.pop(), -1) if len(parts) == 4 else 0
    try:
        w, b, c = (int(x) for x in parts)
    except ValueError:
        raise ValueError(f"{env}={v!r}: expected warps:block:chunks[:hint], e.g. 4:1024:4 or 4:1024:4:l2_256") from None
    if w not in (1, 2, 4, 8, 16, 32) or b < 32 or b & (b - 1) or not 1 <= c <= 16 or hint < 0:
        raise ValueError(f"{env}={v!r}: warps one of 1..32 (a power of two), block a power of two >= 32, "
                         f"chunks 1..16, hint one of {sorted(GATHER_HINTS)}")
    return {"warps": w, "block": b, "chunks": c, **({"hint": hint} if hint else {})}


def fill_gather_options() -> dict:
    """The background fill's copy shape from TIERED_FILL_GATHER (gather_shape_options)."""
    return gather_shape_options(FILL_GATHER_ENV)


DEMAND_GATHER_ENV = "TIERED_GATHER"  # benchmarks: the demand gather's warps:block:chunks


def demand_gather_options(paced: bool = False) -> dict:
    """The device step's demand gather shape from TIERED_GATHER (gather_shape_options; session 53: the H100's
    offload step ran 0.53 ms a token beyond compute plus copies at 54 GB/s, the gather over UVA the suspect).
    paced (--h2d-gbps): a TMA shape gives way to the default loads, as `gather` copies a paced link by loads."""
    shape = gather_shape_options(DEMAND_GATHER_ENV)
    return {} if paced and shape.get("tma") else shape


GATHER_OVERLAP_ENV = "TIERED_GATHER_OVERLAP"  # the device step's demand gather beside the resident experts


def gather_overlap_mode() -> str:
    """TIERED_GATHER_OVERLAP (a benchmark's knob) -> "off", "gate_up" or "down". "0": the device step's experts wait
    for the whole demand gather (the measured comparison); unset, "1" or "gate_up" (the default, session 55's form):
    their gate_up starts beside it, each missed pair's programs waiting for their own rows (moe_decode.Landing),
    and down waits for gate_up as a whole; "down": down starts beside gate_up too, waiting for the resident pairs'
    gate_up, then the copied ones' (session 56 measured its first form, an acquire per pair, 0.95x: not the
    default)."""
    v = os.environ.get(GATHER_OVERLAP_ENV, "").strip() or "1"
    modes = {"0": "off", "1": "gate_up", "gate_up": "gate_up", "down": "down"}
    if v not in modes:
        raise ValueError(f"{GATHER_OVERLAP_ENV}={v!r}: expected 0 (off), 1 or gate_up (the default) or down")
    return modes[v]


def gather_overlap_enabled() -> bool:
    """Whether the device step's experts start beside the demand gather (gather_overlap_mode not "off")."""
    return gather_overlap_mode() != "off"


DEMAND_CTAS_ENV = "TIERED_GATHER_CTAS"  # benchmarks: the demand gather's programs
TOPK_RESOLVE_ENV = "TIERED_TOPK_RESOLVE"
RESOLVE_WARPS_ENV = "TIERED_RESOLVE_WARPS"


def demand_gather_ctas() -> int | None:
    """The device step's demand gather programs from TIERED_GATHER_CTAS (a benchmark's knob); unset: None (gather's
    default, 4 per SM)."""
    v = os.environ.get(DEMAND_CTAS_ENV, "").strip()
    if not v:
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"{DEMAND_CTAS_ENV}={v!r}: expected the demand gather's programs, an integer >= 1")
    return int(v)


def resolve_warps() -> int | None:
    """TIERED_RESOLVE_WARPS (a benchmark's knob): resolve's warps (1, 2, 4, 8 or 16); unset: by the table's slots."""
    v = os.environ.get(RESOLVE_WARPS_ENV, "").strip()
    if not v:
        return None
    if v not in ("1", "2", "4", "8", "16"):
        raise ValueError(f"{RESOLVE_WARPS_ENV}={v!r}: expected resolve's warps, 1, 2, 4, 8 or 16")
    return int(v)


def topk_resolve_enabled() -> bool:
    """TIERED_TOPK_RESOLVE (a benchmark's knob): 1 runs the router's softmax-top-k inside resolve's launch
    (resolve(topk=...)); unset or 0: in its own launch before it. Off by default: on the H200 (session 21, calls
    A-C) the merged launch made the q4 offload step about 2% slower at 4, 2 or 1 warps."""
    v = os.environ.get(TOPK_RESOLVE_ENV, "").strip()
    if v not in ("", "0", "1"):
        raise ValueError(f"{TOPK_RESOLVE_ENV}={v!r}: expected 0 (top-k in its own launch) or 1 (inside resolve)")
    return v == "1"


def fill_windows(n_keys: int) -> int:
    """Picks in a row that find nothing before the fill has surely run dry: the order's windows, plus one (a pick
    that finds no key not resident in its window moves the cursor a whole window on)."""
    return -(-n_keys // min(FILL_WINDOW, n_keys)) + 1


def fill_pick(order: Tensor, cursor: Tensor, t: dict[str, Tensor], n_fill: Tensor, keep_free: int, out_key: Tensor,
              out_slot: Tensor, out_src: Tensor, picked: Tensor) -> None:
    """Background fill, step 1: up to n_fill[0] (int64 [1] on the device: a captured step reads it at each replay;
    at most out_key's length) keys not resident, the first of `order` (int64 [N'], the keys in
    fill order) from cursor (int64 [1], advanced past the last key taken) within FILL_WINDOW keys, each paired
    with a free slot (lowest index first), leaving keep_free slots free for demand misses. Each chosen slot is
    reserved (key_of = -2 - key: resolve neither takes nor evicts it) until `fill_install`. Writes out_key,
    out_slot, out_src (the key's RAM row, for `gather`) int64 [C], -1 where nothing was picked; adds their number
    to picked int64 [1] (what the host watches to know when the fill has run dry)."""
    S, n = t["key_of"].shape[0], order.shape[0]
    if order.device.type != "cuda":
        return fill_pick_reference(order, cursor, t, n_fill, keep_free, out_key, out_slot, out_src, picked)
    W = min(FILL_WINDOW, _p2(n))
    C = out_key.shape[0]
    _fill_pick_kernel[(1,)](order, cursor, t["slot_of"], t["key_of"], t["host_row"], out_key, out_slot, out_src,
                            picked, n, S, C, n_fill, int(keep_free), C_P=_p2(C), S_P=_p2(S), W_P=W,
                            num_warps=4 if S <= 1024 else 8 if S <= 4096 else 16, **launch_args(order.device))


def fill_pick_reference(order: Tensor, cursor: Tensor, t: dict[str, Tensor], n_fill: Tensor, keep_free: int,
                        out_key: Tensor, out_slot: Tensor, out_src: Tensor, picked: Tensor) -> None:
    """fill_pick in plain torch on host values (CPU path and test reference)."""
    key_of, slot_of = t["key_of"], t["slot_of"]
    C = out_key.shape[0]
    n_fill = min(int(n_fill[0]), C)
    n = order.shape[0]
    c0 = int(cursor[0])
    window = [int(order[(c0 + i) % n]) for i in range(min(n, FILL_WINDOW))]
    pos = [i for i, k in enumerate(window) if int(slot_of[k]) < 0]
    free = [s for s in range(key_of.shape[0]) if int(key_of[s]) == -1]
    take = max(0, min(len(pos), int(n_fill), len(free) - int(keep_free)))
    keys, slots, src = [-1] * C, [-1] * C, [-1] * C
    for r in range(take):
        keys[r], slots[r] = window[pos[r]], free[r]
        src[r] = int(t["host_row"][keys[r]])
        key_of[slots[r]] = -2 - keys[r]
    picked[0] += take
    step = pos[take - 1] + 1 if take else (min(n, len(window)) if not pos else 0)
    cursor[0] = (c0 + step) % n
    out_key.copy_(torch.tensor(keys, dtype=torch.int64))
    out_slot.copy_(torch.tensor(slots, dtype=torch.int64))
    out_src.copy_(torch.tensor(src, dtype=torch.int64))


def fill_install(fill_key: Tensor, fill_slot: Tensor, t: dict[str, Tensor]) -> None:
    """Background fill, step 2 (after the copies into the reserved slots): each picked key takes its slot, entering
    cold (last use 0, no uses), unless a demand miss made it resident meanwhile (the slot is freed); every copied
    block counts in counts[3] (loaded ahead of use)."""
    n = fill_key.shape[0]
    if fill_key.device.type != "cuda":
        return fill_install_reference(fill_key, fill_slot, t)
    _fill_install_kernel[(1,)](fill_key, fill_slot, t["slot_of"], t["key_of"], t["last"], t["uses"], t["counts"], n,
                               C_P=_p2(n), **launch_args(fill_key.device))


def fill_install_reference(fill_key: Tensor, fill_slot: Tensor, t: dict[str, Tensor]) -> None:
    """fill_install in plain torch on host values (CPU path and test reference)."""
    for k, s in zip(fill_key.tolist(), fill_slot.tolist()):
        if k < 0:
            continue
        if int(t["slot_of"][k]) < 0:
            t["slot_of"][k] = s
            t["key_of"][s] = k
            t["last"][s] = 0
            t["uses"][s] = 0
        else:
            t["key_of"][s] = -1
        t["counts"][3] += 1


def lookup(ids: Tensor, id_row: Tensor, out: Tensor, out_row: Tensor, base: Tensor, slot_of: Tensor,
           bad: Tensor, load: tuple | None = None) -> None:
    """A complete table's lookup (every MoE key resident: the copy fill has landed them all, and nothing is evicted
    while that holds), in place of resolve and gather: for each row r, ids[id_row[r]] (int64 [K]) of the layer whose
    keys start at base[r] -> slots into out[out_row[r]] (out int64 [*, K] contiguous). id_row, out_row, base: int64
    [R] on the device, the rows' keys distinct (a step's layers). No clock, use or counter is touched. A key found
    not resident (an internal error) reads slot 0 and raises bad (int64 [1]) to at least key + 1, which the table's
    harvest reports.
    load = (host_row int64 [N], src int64 [*, K] contiguous, counts int64 [>= 2]): a plan of every key is still in
    flight (the copy fill; nothing is evicted then either): a planned key (slot_of = -2 - its reserved slot) is
    loaded there as resolve would (slot_of takes the slot; its RAM row goes to src[out_row[r]], -1 for the others,
    for `gather`), and counts[0] / counts[1] add the hits and the loads. The clock, last use and use counts are
    not touched (with room for every key, no eviction reads them). CUDA: one program; else the reference."""
    if ids.dim() != 2 or out.dim() != 2 or ids.shape[1] != out.shape[1] or not out.is_contiguous() \
            or ids.stride(1) != 1:
        raise ValueError(f"lookup wants ids [*, K] with unit stride and out [*, K] contiguous; got {tuple(ids.shape)}"
                         f" and {tuple(out.shape)}")
    if load is not None and (load[1].shape != out.shape or not load[1].is_contiguous()):
        raise ValueError(f"lookup's src must be shaped as out {tuple(out.shape)}, contiguous")
    if ids.device.type != "cuda":
        return lookup_reference(ids, id_row, out, out_row, base, slot_of, bad, load)
    R, K = id_row.shape[0], ids.shape[1]
    host_row, src, counts = load if load is not None else (out, out, out)  # (placeholders, never read)
    _lookup_kernel[(1,)](ids, ids.stride(0), id_row, out, out_row, base, slot_of, bad, host_row, src, counts, R, K=K,
                         R_P=_p2(R), K_P=_p2(K), LOAD=load is not None, **launch_args(ids.device))


def lookup_reference(ids: Tensor, id_row: Tensor, out: Tensor, out_row: Tensor, base: Tensor, slot_of: Tensor,
                     bad: Tensor, load: tuple | None = None) -> None:
    """lookup in plain torch (CPU path and test reference)."""
    for ir, orow, b in zip(id_row.tolist(), out_row.tolist(), base.tolist()):
        keys = ids[ir].to(torch.int64) + b
        s = slot_of.index_select(0, keys).to(torch.int64)
        if load is not None:
            host_row, src, counts = load
            planned = s <= -2
            s = torch.where(planned, -2 - s, s)
            slot_of[keys[planned]] = s[planned].to(slot_of.dtype)
            src[orow].copy_(torch.where(planned, host_row.index_select(0, keys), -1))
            counts[0] += int(((s >= 0) & ~planned).sum())
            counts[1] += int(planned.sum())
        if bool((s < 0).any()):
            bad[0] = max(int(bad[0]), int(keys[s < 0].max()) + 1)
        out[orow].copy_(s.clamp(min=0))


def fill_land(plan_key: Tensor, plan_slot: Tensor, landed: Tensor, installed: Tensor, t: dict[str, Tensor]) -> None:
    """The copy-engine fill (store/copyfill.py), at a step's start: the plan's entries (plan_key, plan_slot int64
    [P] on the device; each key reserved as slot_of = -2 - slot, its slot as key_of = -2 - key) from installed[0] up
    to landed[0] (int64 [1]: the copy stream writes it after each batch of copies) enter the table: a key no demand
    miss loaded meanwhile takes its slot cold (last use 0, no uses); one a demand miss loaded into that reserved slot
    (resolve does, evicting nothing) is resident already. Either way the slot becomes evictable (key_of = key).
    installed[0] moves to landed[0]. CUDA: one program; else the reference."""
    n = plan_key.shape[0]
    if plan_key.device.type != "cuda":
        return fill_land_reference(plan_key, plan_slot, landed, installed, t)
    _fill_land_kernel[(1,)](plan_key, plan_slot, landed, installed, t["slot_of"], t["key_of"], t["last"], t["uses"],
                            n, C_P=64, **launch_args(plan_key.device))


def fill_land_reference(plan_key: Tensor, plan_slot: Tensor, landed: Tensor, installed: Tensor,
                        t: dict[str, Tensor]) -> None:
    """fill_land in plain torch on host values (CPU path and test reference)."""
    lo, hi = int(installed[0]), min(int(landed[0]), plan_key.shape[0])
    for i in range(lo, hi):
        k, sl = int(plan_key[i]), int(plan_slot[i])
        s = int(t["slot_of"][k])
        if s == -2 - sl:
            t["slot_of"][k] = sl
            t["last"][sl] = 0
            t["uses"][sl] = 0
        t["key_of"][sl] = k if s in (sl, -2 - sl) else -1
    installed[0] = max(hi, lo)


def fill_cancel(plan_key: Tensor, plan_slot: Tensor, t: dict[str, Tensor]) -> None:
    """The copy-engine fill's entries never copied (a decode phase ended first): each reserved slot is freed and
    its key is not resident again, unless a demand miss loaded the key into it (then it is resident there and
    evictable). torch ops on the table's device (a phase change, not a step)."""
    if plan_key.numel() == 0:
        return
    s = t["slot_of"].index_select(0, plan_key).to(torch.int64)
    dem = s == plan_slot
    t["key_of"].index_copy_(0, plan_slot, torch.where(dem, plan_key, -1).to(torch.int32))
    t["slot_of"].index_copy_(0, plan_key, torch.where(dem, s, -1).to(torch.int32))


def split_install(split_c: Tensor, t: dict[str, Tensor]) -> None:
    """--cpu-split admit, after the step's later copies landed: every admitted split slot in split_c int64 [L, 3]
    (rows > 0, its slot reserved by resolve as key_of = -2 - key) enters the table under its key. CUDA: one
    program; else the reference."""
    if split_c.device.type != "cuda":
        return split_install_reference(split_c, t)
    n = split_c.shape[0]
    _split_install_kernel[(1,)](split_c, t["slot_of"], t["key_of"], n, R_P=_p2(n), **launch_args(split_c.device))


def split_install_reference(split_c: Tensor, t: dict[str, Tensor]) -> None:
    """split_install in plain torch on host values (CPU path and test reference)."""
    for rows, s, _ in split_c.tolist():
        if rows > 0 and s >= 0 and int(t["key_of"][s]) < -1:
            k = -2 - int(t["key_of"][s])
            t["key_of"][s] = k
            t["slot_of"][k] = s
