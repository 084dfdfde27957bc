"""The two ends of a captured one-token step as Triton launches: what the step reads from its token and position
buffers, and the greedy pick it writes back into them.

Owns: `step_inputs(token, pos, embed, cos, sin)` -> (h [1, D], cos [1, r], sin [1, r], lengths [1] int32): the
token's embedding row, the position's rotary rows and the cache length after the step (pos + 1), in one launch;
`rows_inputs(rows, head, embed, cos, sin)`: the same for a batch graph's rows (decode/batchgraph.py), with the
lengths, the block table in int32 and the valid rows, from the bucket's buffer in one launch;
`embed_rows(tokens, embed)`: a prompt's or a batch step's embedding rows, for a table kept in pinned host memory
(`--embed host`: each row read over PCIe); `greedy_pick(logits, token, pos)`: each row's token <- argmax(logits[r])
(the first index of the maximum, as torch.argmax), pos <- pos + 1, in two launches (a partial maximum per block of
the vocabulary, then the pick among them); `enabled()` (TIERED_STEP_IO=torch keeps torch's ops: the benchmarks
time both).
Does not own: the steps (model/transformer.py `decode_static`, which takes step_inputs where its plan is the triton
backend's; decode/batchgraph.py's body), the graphs and their buffers (decode/graphed.py, which takes greedy_pick
for greedy replays), nor the torch ops they replace, which stay the reference and the CPU path (F.embedding, Rope
rows by index_select, casts, decode/sampling.py argmax_into, pos.add_(1)).

Why: those torch ops are eight small kernels a token (three index_selects, an add, a cast, argmax, its copy into the
token buffer, the position's add), launched without PDL, so each one waits for the last to drain and starts from
nothing (notes/Q4_DECODE.md, session 47). These three are PDL-aware (kernels/pdl.py): they wait first, then let the
next kernel launch. Every value is copied or compared, never computed: the results equal torch's exactly.

The embedding table may live in pinned host memory (`--embed host`, model/transformer.py): the launches read its
rows over UVA (slot_table.HostPointer), so its GPU memory goes to expert slots.

NaN logits: the pick takes a NaN as +inf (torch.argmax takes the first NaN; the two differ only when a +inf comes
before the first NaN).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from tiered.kernels.fused_norm import _check_device, _warps, triton, tl
from tiered.kernels.pdl import gdc_enter, launch_args

ENV = "TIERED_STEP_IO"
PICK_BLOCK = 4096  # logits a program of the pick's first launch compares (151,936: 38 programs)


def enabled() -> bool:
    """Whether captured one-token steps take these kernels where they serve (TIERED_STEP_IO=torch: torch's ops)."""
    v = os.environ.get(ENV, "kernel").strip().lower()
    if v not in ("kernel", "torch"):
        raise ValueError(f"{ENV}={v!r}: use 'kernel' (the default) or 'torch'")
    return v == "kernel"


def _table(embed: Tensor, dev: torch.device) -> Any:
    """The embedding table as a launch on `dev` reads it: itself, or for a pinned host table under CUDA launches its
    UVA pointer (the kernel reads each row over PCIe)."""
    if dev.type == "cuda" and embed.device.type == "cpu":
        from tiered.kernels.slot_table import HostPointer  # CUDA only (slot_table needs Triton)

        if not embed.is_pinned():
            raise ValueError("an embedding table on the host must be pinned for the GPU to read it (--embed host)")
        return HostPointer(embed)
    if embed.device != dev:
        raise ValueError(f"the embedding table is on {embed.device}, the step's buffers on {dev}")
    return embed


def embed_rows(tokens: Tensor, embed: Tensor) -> Tensor:
    """tokens [T] int64 (on the device) -> embed[tokens] [T, D] on the device, in one launch: a prompt's or a batch
    step's rows, for a table in pinned host memory (`--embed host`; a table on the device takes F.embedding). The
    ids are read on the device, so they are not checked: token < V is the caller's."""
    _check_device(tokens, "embed_rows")
    if tokens.dim() != 1 or tokens.dtype != torch.int64 or embed.dim() != 2 or embed.stride(1) != 1:
        raise ValueError(f"embed_rows wants tokens [T] int64 and embed [V, D] with a unit column stride; got "
                         f"{tuple(tokens.shape)} {tokens.dtype}, {tuple(embed.shape)}")
    dev = tokens.device
    D = embed.shape[1]
    out = torch.empty((tokens.shape[0], D), dtype=embed.dtype, device=dev)
    if tokens.shape[0]:
        block = triton.next_power_of_2(D)
        _EMBED_ROWS[(tokens.shape[0],)](tokens.contiguous(), _table(embed, dev), out, D, embed.stride(0),
                                        BLOCK_D=block, num_warps=_warps(block), **launch_args(dev))
    return out


def step_inputs(token: Tensor, pos: Tensor, embed: Tensor, cos: Tensor, sin: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """token [1] and pos [1] (int64, on the device), embed [V, D], cos / sin [P, r] (layers.Rope's tables)
    -> (embed[token] [1, D], cos[pos] [1, r], sin[pos] [1, r], pos + 1 [1] int32), all on the device, no sync.
    token and pos are read on the device, so they are not checked: token < V and pos < P are the caller's. embed
    may be a pinned host table (`--embed host`)."""
    _check_device(token, "step_inputs")
    if token.shape != (1,) or pos.shape != (1,) or token.dtype != torch.int64 or pos.dtype != torch.int64:
        raise ValueError(f"step_inputs wants token and pos of shape [1], int64; got {tuple(token.shape)} "
                         f"{token.dtype}, {tuple(pos.shape)} {pos.dtype}")
    if embed.dim() != 2 or cos.dim() != 2 or cos.shape != sin.shape or embed.stride(1) != 1 or cos.stride(1) != 1 \
            or sin.stride(1) != 1:
        raise ValueError(f"step_inputs wants embed [V, D] and cos, sin [P, r] with unit column strides; got "
                         f"{tuple(embed.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    D, R = embed.shape[1], cos.shape[1]
    dev = token.device
    h = torch.empty((1, D), dtype=embed.dtype, device=dev)
    c = torch.empty((1, R), dtype=cos.dtype, device=dev)
    s = torch.empty((1, R), dtype=sin.dtype, device=dev)
    lengths = torch.empty(1, dtype=torch.int32, device=dev)
    block = triton.next_power_of_2(D)
    _STEP_IN[(1,)](token, pos, _table(embed, dev), cos, sin, h, c, s, lengths, D, R, embed.stride(0), cos.stride(0),
                   sin.stride(0), BLOCK_D=block, BLOCK_R=triton.next_power_of_2(R), num_warps=_warps(block),
                   **launch_args(dev))
    return h, c, s, lengths


def rows_inputs(rows: Tensor, head: int, embed: Tensor, cos: Tensor, sin: Tensor) -> dict[str, Tensor]:
    """The batch graphs' inputs (decode/batchgraph.py) from a bucket's buffer rows [head + MP, Bb] int64 (row 0 the
    tokens, 1 the positions, 3 the lengths, head.. the block table, column b the step's row b) in one launch:
    {"h": embed[tokens] [Bb, D], "cos", "sin": the positions' rotary rows [Bb, r], "seqlens": lengths int32 [Bb],
    "bt": the block table int32 [Bb, MP], "valid": lengths > 0 bool [Bb]}: what torch's six ops give. embed may be
    a pinned host table (`--embed host`)."""
    _check_device(rows, "rows_inputs")
    if rows.dim() != 2 or rows.dtype != torch.int64 or rows.shape[0] <= head or rows.stride(1) != 1:
        raise ValueError(f"rows_inputs wants the buffer rows [head + MP, Bb] int64, contiguous rows; got "
                         f"{tuple(rows.shape)} {rows.dtype} (head {head})")
    if embed.stride(1) != 1 or cos.stride(1) != 1 or sin.stride(1) != 1 or cos.shape != sin.shape:
        raise ValueError("rows_inputs wants embed [V, D] and cos, sin [P, r] with unit column strides")
    mp, bb = rows.shape[0] - head, rows.shape[1]
    D, R = embed.shape[1], cos.shape[1]
    dev = rows.device
    out = {"h": torch.empty((bb, D), dtype=embed.dtype, device=dev),
           "cos": torch.empty((bb, R), dtype=cos.dtype, device=dev),
           "sin": torch.empty((bb, R), dtype=sin.dtype, device=dev),
           "seqlens": torch.empty(bb, dtype=torch.int32, device=dev),
           "bt": torch.empty((bb, mp), dtype=torch.int32, device=dev),
           "valid": torch.empty(bb, dtype=torch.int8, device=dev)}
    block = triton.next_power_of_2(D)
    _ROWS_IN[(bb,)](rows, rows.stride(0), head, mp, _table(embed, dev), cos, sin, out["h"], out["cos"], out["sin"],
                    out["seqlens"], out["bt"], out["valid"], D, R, embed.stride(0), cos.stride(0), sin.stride(0),
                    BLOCK_D=block, BLOCK_R=triton.next_power_of_2(R), BLOCK_MP=triton.next_power_of_2(mp),
                    num_warps=_warps(block), **launch_args(dev))
    out["valid"] = out["valid"].view(torch.bool)
    return out


def greedy_pick(logits: Tensor, token: Tensor, pos: Tensor | None = None, *, block: int = PICK_BLOCK) -> None:
    """token [R] int64 <- each row's first index of its maximum (logits [R, V], any float dtype), and pos [R] int64
    <- pos + 1 when given; stream-ordered, no sync, no shape that depends on the values (a graph captures it)."""
    _check_device(logits, "greedy_pick")
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"greedy_pick wants logits [R, V] with unit column stride; got {tuple(logits.shape)}")
    R = logits.shape[0]
    if token.shape != (R,) or token.dtype != torch.int64 or (pos is not None and (pos.shape != (R,)
                                                                                  or pos.dtype != torch.int64)):
        raise ValueError(f"greedy_pick wants token (and pos) of shape [{R}] (a row of logits each), int64")
    if block & (block - 1) or block < 16:
        raise ValueError(f"greedy_pick: block must be a power of two >= 16, got {block}")
    if token.stride(0) != 1 or (pos is not None and pos.stride(0) != 1):
        raise ValueError("greedy_pick wants contiguous token (and pos) rows")
    V = logits.shape[1]
    parts = triton.cdiv(V, block)
    dev = logits.device
    pv = torch.empty((R, parts), dtype=torch.float32, device=dev)
    pi = torch.empty((R, parts), dtype=torch.int32, device=dev)
    args = launch_args(dev)
    _PICK_PART[(parts, R)](logits, logits.stride(0), pv, pi, V, parts, BLOCK=block, num_warps=_warps(block), **args)
    _PICK[(R,)](pv, pi, token, token if pos is None else pos, parts, BLOCK_P=max(16, triton.next_power_of_2(parts)),
                ADVANCE=pos is not None, num_warps=1, **args)


# --- kernels (plain functions, wrapped by triton.jit below: compiled, or interpreted on CPU) ---

def _embed_rows_kernel(TOK, EMB, H, D, s_e, BLOCK_D: tl.constexpr, GDC: tl.constexpr = False):
    gdc_enter(GDC)
    t = tl.program_id(0).to(tl.int64)
    tok = tl.load(TOK + t).to(tl.int64)
    o = tl.arange(0, BLOCK_D)
    m = o < D
    tl.store(H + t * D + o, tl.load(EMB + tok * s_e + o, mask=m), mask=m)


def _step_in_kernel(TOK, POS, EMB, COS, SIN, H, C, S, LEN, D, R, s_e, s_c, s_s,
                    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, GDC: tl.constexpr = False):
    gdc_enter(GDC)
    tok = tl.load(TOK).to(tl.int64)
    p = tl.load(POS).to(tl.int64)
    o = tl.arange(0, BLOCK_D)
    m = o < D
    tl.store(H + o, tl.load(EMB + tok * s_e + o, mask=m), mask=m)
    r = tl.arange(0, BLOCK_R)
    mr = r < R
    tl.store(C + r, tl.load(COS + p * s_c + r, mask=mr), mask=mr)
    tl.store(S + r, tl.load(SIN + p * s_s + r, mask=mr), mask=mr)
    tl.store(LEN, (p + 1).to(tl.int32))


def _rows_in_kernel(ROWS, s_rows, head, MP, EMB, COS, SIN, H, C, S, SEQ, BT, VALID, D, R, s_e, s_c, s_s,
                    BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_MP: tl.constexpr, GDC: tl.constexpr = False):
    """Program b: column b of the buffer rows (token, position, length, block table) -> row b of each input."""
    gdc_enter(GDC)
    b = tl.program_id(0).to(tl.int64)
    tok = tl.load(ROWS + b)
    p = tl.load(ROWS + s_rows + b)
    n = tl.load(ROWS + 3 * s_rows + b)
    o = tl.arange(0, BLOCK_D)
    m = o < D
    tl.store(H + b * D + o, tl.load(EMB + tok * s_e + o, mask=m), mask=m)
    r = tl.arange(0, BLOCK_R)
    mr = r < R
    tl.store(C + b * R + r, tl.load(COS + p * s_c + r, mask=mr), mask=mr)
    tl.store(S + b * R + r, tl.load(SIN + p * s_s + r, mask=mr), mask=mr)
    tl.store(SEQ + b, n.to(tl.int32))
    tl.store(VALID + b, (n > 0).to(tl.int8))
    j = tl.arange(0, BLOCK_MP)
    mj = j < MP
    tl.store(BT + b * MP + j, tl.load(ROWS + (head + j) * s_rows + b, mask=mj).to(tl.int32), mask=mj)


def _pick_part_kernel(X, s_x, PV, PI, V, P, BLOCK: tl.constexpr, GDC: tl.constexpr = False):
    """Program (k, r): the maximum of row r's logits [k*BLOCK, (k+1)*BLOCK) and the first index holding it."""
    gdc_enter(GDC)
    k = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    o = k * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + r * s_x + o, mask=o < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN as +inf
    best = tl.max(x, axis=0)
    first = tl.min(tl.where((x == best) & (o < V), o, V), axis=0)
    tl.store(PV + r * P + k, best)
    tl.store(PI + r * P + k, first)


def _pick_kernel(PV, PI, TOK, POS, P, BLOCK_P: tl.constexpr, ADVANCE: tl.constexpr, GDC: tl.constexpr = False):
    """Program r: row r's blocks' maxima are in index order, so the first block holding the overall maximum holds its
    first index."""
    gdc_enter(GDC)
    r = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BLOCK_P)
    m = o < P
    v = tl.load(PV + r * P + o, mask=m, other=float("-inf"))
    i = tl.load(PI + r * P + o, mask=m, other=2147483647)
    best = tl.max(v, axis=0)
    first = tl.min(tl.where((v == best) & m, i, 2147483647), axis=0)
    tl.store(TOK + r, first.to(tl.int64))
    if ADVANCE:
        tl.store(POS + r, tl.load(POS + r) + 1)


_STEP_IN = _ROWS_IN = _PICK_PART = _PICK = _EMBED_ROWS = None
if triton is not None:
    _STEP_IN = triton.jit(_step_in_kernel)
    _EMBED_ROWS = triton.jit(_embed_rows_kernel)
    _ROWS_IN = triton.jit(_rows_in_kernel)
    _PICK_PART = triton.jit(_pick_part_kernel)
    _PICK = triton.jit(_pick_kernel)
