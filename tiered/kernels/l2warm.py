"""Warming L2 a layer ahead: a side-stream kernel asks L2 for the weights the next layer's dense GEMVs will read,
while this layer's experts run.

Owns: `warm_mode()` (TIERED_L2_WARM: off, lines, last, bulk), `chunk_table` (a device table of (address, bytes)
chunks over some tensors), `L2Warm` (the side stream, one table per target, `fork(key)` and `join()`), and the two
prefetch kernels.
Does not own: which tensors are worth warming, or when (model/transformer.py decides: after layer l's router, layer
l + 1's qkv and o_proj; after the last layer's, the first bytes of the lm_head).

Why: a one-token q4 step is about 87 kernels, most of them one wave of programs that wait on DRAM (notes/
Q4_DECODE.md, session 15's ncu: 15-54% of HBM's peak, 35-65% of cycles with no eligible warp). The dense GEMVs
already load their first step of weights before their PDL wait, which hides at most the kernel before them. A
prefetch issued a whole layer earlier lets the weights arrive while the experts leave HBM idle, so the GEMVs read
L2. Whether that is faster is measured, not assumed: off by default until the box says so.

The kernels: `lines` issues `prefetch.global.L2` per 128-byte line (`last`: with the evict_last policy, so the
experts' streaming reads do not push the warmed lines out first); `bulk` issues one `cp.async.bulk.prefetch.L2`
(sm_90, the TMA unit) per chunk. Neither writes anything or returns a value, so a warm never changes a result: on
the CPU, under the interpreter or with the mode off, fork and join do nothing.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU torch wheel without triton
    triton = None
    tl = None

ENV = "TIERED_L2_WARM"
MODES = ("off", "lines", "last", "bulk")
LINE = 128  # bytes of an L2 line
LINES = 1024  # lines a program of the lines kernel asks for (one chunk = 128 KiB)
BULK = 64 * 1024  # bytes of a bulk chunk (a multiple of 16)
BULK_BLOCK = 64  # bulk chunks a program issues (one a thread at 2 warps)


def warm_mode() -> str:
    """TIERED_L2_WARM: off (default), lines, last or bulk; anything else is an error that names the choices."""
    v = os.environ.get(ENV, "off").strip().lower() or "off"
    v = {"0": "off", "no": "off", "false": "off", "1": "lines", "on": "lines"}.get(v, v)
    if v not in MODES:
        raise ValueError(f"{ENV}={v!r}: expected one of {', '.join(MODES)}")
    return v


def chunk_table(tensors: list[Tensor], chunk: int, *, share: float = 1.0, block: int = 1) -> Tensor:
    """The (address, bytes) rows [n, 2] int64 that cover `tensors`' storage (each contiguous) in pieces of at most
    `chunk` bytes: the first `share` of each tensor's bytes (its leading rows: a weight's codes, scales and minima of
    the same rows); starts rounded down and ends up to 16 bytes (inside the caching allocator's 512-byte blocks).
    Padded to a multiple of `block` rows by repeating the last row (the kernels read whole blocks). On the host; the
    caller moves it."""
    rows: list[tuple[int, int]] = []
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"chunk_table: a tensor of shape {list(t.shape)} is not contiguous")
        lo, n = t.data_ptr(), int(t.numel() * t.element_size() * min(1.0, share))
        a, end = lo & ~15, (lo + n + 15) & ~15
        while a < end:
            rows.append((a, min(chunk, end - a)))
            a += chunk
    if not rows:
        raise ValueError("chunk_table: nothing to cover")
    rows += [rows[-1]] * (-len(rows) % block)
    return torch.tensor(rows, dtype=torch.int64)


class L2Warm:
    """Per target key, a chunk table on `device`; `fork(key)` asks L2 for the target's bytes on a side stream that
    waits for everything the current stream has issued so far; `join()` makes the current stream wait for the side
    stream (a CUDA-graph capture must end joined). Nothing happens when the mode is off or the device is not CUDA."""

    def __init__(self, device: torch.device, mode: str | None = None) -> None:
        self.device = torch.device(device)
        self.mode = warm_mode() if mode is None else mode
        if self.mode not in MODES:
            raise ValueError(f"L2Warm: mode {self.mode!r} is not one of {MODES}")
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if self.device.type != "cuda" or triton is None or interp:
            self.mode = "off"
        self.tables: dict = {}
        self.bytes: dict = {}
        self._side = torch.cuda.Stream(self.device) if self.mode != "off" else None
        self._forked = False

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def add(self, key, tensors: list[Tensor], *, limit: int | None = None) -> None:
        """Register the target `key`: the storage of `tensors`, or where `limit` bytes are fewer, the same leading
        share of each tensor."""
        if not self.on:
            return
        bulk = self.mode == "bulk"
        total = sum(t.numel() * t.element_size() for t in tensors)
        share = 1.0 if limit is None or limit >= total else limit / total
        t = chunk_table(tensors, BULK if bulk else LINE * LINES, share=share, block=BULK_BLOCK if bulk else 1)
        self.tables[key] = t.to(self.device)
        self.bytes[key] = int(t[:, 1].sum())

    def add_rows(self, key, stacks: list[Tensor]) -> None:
        """Register the target `key` of rows: `stacks` are [E, ...] tensors whose rows are each contiguous (an
        expert pool's parts, one layer's slice; rows may sit apart, as in the expert-contiguous pool), and
        `fork(key, ids)` asks for row ids[k] of each, for every k."""
        if not self.on:
            return
        rows = []
        for t in stacks:
            if not t[0].is_contiguous():
                raise ValueError(f"L2Warm.add_rows: a row of shape {list(t.shape[1:])} is not contiguous")
            stride = t.stride(0) * t.element_size()
            for r in chunk_table([t[0]], LINE * LINES).tolist():
                rows.append((t.data_ptr(), stride, r[0] - t.data_ptr(), r[1]))
        self.tables[key] = torch.tensor(rows, dtype=torch.int64).to(self.device)
        self.bytes[key] = sum(r[3] for r in rows)

    def fork(self, key, ids: Tensor | None = None) -> None:
        """Ask L2 for target `key` on the side stream, after the current stream's work so far (no-op if unknown);
        a target of rows (add_rows) takes `ids` [K] int64 on the device, the rows to warm."""
        table = self.tables.get(key)
        if table is None:
            return
        cur = torch.cuda.current_stream(self.device)
        self._side.wait_stream(cur)
        with torch.cuda.stream(self._side):
            n = table.shape[0]
            if ids is not None:
                _WARM_ROWS[(ids.numel(), n)](table, ids, BLOCK=LINES, num_warps=4)
            elif self.mode == "bulk":
                _WARM_BULK[(n // BULK_BLOCK,)](table, BLOCK=BULK_BLOCK, num_warps=2)
            else:
                _WARM_LINES[(n,)](table, BLOCK=LINES, LAST=self.mode == "last", num_warps=4)
        self._forked = True

    def join(self) -> None:
        """The current stream waits for every fork since the last join."""
        if self._forked:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
            self._forked = False


def _warm_lines(T, BLOCK: tl.constexpr, LAST: tl.constexpr):
    """Program c: prefetch.global.L2 of every 128-byte line of chunk c (addresses past its bytes repeat its first)."""
    c = tl.program_id(0)
    a = tl.load(T + 2 * c)
    n = tl.load(T + 2 * c + 1)
    offs = tl.arange(0, BLOCK).to(tl.int64) * 128
    addr = a + tl.where(offs < n, offs, 0)
    if LAST:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr],
                                  dtype=tl.int32, is_pure=False, pack=1)


def _warm_rows(T, IDS, BLOCK: tl.constexpr):
    """Program (k, c): prefetch.global.L2 of the lines of chunk c of row IDS[k]: table row c is (address of row 0,
    bytes between rows, offset of the chunk in a row, bytes of the chunk)."""
    k = tl.program_id(0)
    c = tl.program_id(1)
    e = tl.load(IDS + k).to(tl.int64)
    a = tl.load(T + 4 * c) + e * tl.load(T + 4 * c + 1) + tl.load(T + 4 * c + 2)
    n = tl.load(T + 4 * c + 3)
    offs = tl.arange(0, BLOCK).to(tl.int64) * 128
    addr = a + tl.where(offs < n, offs, 0)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr],
                              dtype=tl.int32, is_pure=False, pack=1)


def _warm_bulk(T, BLOCK: tl.constexpr):
    """Program p: one cp.async.bulk.prefetch.L2 per chunk of rows p*BLOCK..p*BLOCK+BLOCK-1 (one a thread)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(T + 2 * r)
    n = tl.load(T + 2 * r + 1).to(tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r", [a, n],
                              dtype=tl.int32, is_pure=False, pack=1)


_WARM_LINES = _WARM_BULK = _WARM_ROWS = None
if triton is not None:
    _WARM_LINES = triton.jit(_warm_lines)
    _WARM_BULK = triton.jit(_warm_bulk)
    _WARM_ROWS = triton.jit(_warm_rows)
