"""First-use checksums for experts used straight from the layout (resident mode): which blocks were checked.

Owns: `BlockChecker`, which hashes (xxh3_64) the blocks of a layout that have not been checked yet, compares
each with the manifest and raises ExpertReadError naming the layer, expert, file and offset of a mismatch.
Hashing runs on a few threads (xxhash releases the GIL), so a whole-model check at load is bounded by the disk or
memory bandwidth rather than one core. `--verify first-use` means the same in every mode: the expert cache checks
a block when it first reads it from disk (store/io.py); resident experts are checked here, at load on CUDA (the
copy to the device reads every block anyway) and at first touch on CPU (the mmap reads a block when first used).
Does not own: reading blocks into buffers or the cache's own first-use check (store/io.py).
"""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import xxhash

from tiered.store.io import BlockRef, ExpertReadError

PARALLEL_BYTES = 64 * 2**20  # hash on threads from this many bytes per call (a load, a long prefill)


class BlockChecker:
    """The first-use check of the L*E blocks of a layout, over zero-copy views of its mmap."""

    def __init__(self, layout: Any, *, threads: int | None = None) -> None:
        cfg = layout.config
        self.layout = layout
        self.num_experts = cfg.num_experts
        self.rows = cfg.num_layers * cfg.num_experts
        self.checked = bytearray(self.rows)  # 1 = hashed and matched the manifest
        self.pending = self.rows
        self.threads = max(1, min(threads or os.cpu_count() or 1, 8))
        self.seconds = 0.0  # wall time spent hashing

    def _ref(self, row: int) -> BlockRef:
        layer, expert = divmod(row, self.num_experts)
        path, off, size, xxh = self.layout.block_offset(layer, expert)
        return BlockRef(layer, expert, path, int(off), int(size), str(xxh))

    def _hash(self, row: int) -> str:
        layer, expert = divmod(row, self.num_experts)
        return xxhash.xxh3_64(self.layout.block_bytes(layer, expert)).hexdigest()

    def check(self, rows: Iterable[int]) -> None:
        """Hash every row (= layer*E + expert) not checked yet; raise ExpertReadError on the first mismatch."""
        if not self.pending:
            return
        todo = sorted({int(r) for r in rows if not self.checked[int(r)]})
        if not todo:
            return
        t0 = time.perf_counter()
        if self.threads > 1 and len(todo) * self.layout.block_size >= PARALLEL_BYTES:
            with ThreadPoolExecutor(min(self.threads, len(todo))) as ex:
                got = list(ex.map(self._hash, todo))
        else:  # a few blocks (first touch): threads would cost more than they save
            got = [self._hash(r) for r in todo]
        self.seconds += time.perf_counter() - t0
        want = self.layout.manifest.checksums
        for row, h in zip(todo, got):
            if h != want[row]:
                ref = self._ref(row)
                raise ExpertReadError(
                    f"{ref.where()}: checksum mismatch, xxh3_64 {h} but the manifest says {ref.xxh3}: the layout "
                    f"is corrupt; run `tiered verify {self.layout.path}` to list bad blocks and rebuild it with "
                    f"`tiered repack SRC {self.layout.path} --force`")
            self.checked[row] = 1
            self.pending -= 1

    def stats(self) -> dict:
        return {"verify": "first-use", "verified_blocks": self.rows - self.pending, "verify_s": self.seconds}


def progress_bar(total: int, desc: str):
    """A byte progress bar on stderr, shown only on a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, disable=None,
                file=sys.stderr, dynamic_ncols=True, leave=False)
