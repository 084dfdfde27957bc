"""Disk-tier reads of expert blocks: page-cache reads, O_DIRECT reads, checksums.

Owns: `BlockReader`, which moves one expert block of experts.bin into a host buffer, either
through the page cache (`io="mmap"`: buffered `preadv`, or no copy at all when the mapped block is
registered with the GPU) or around it (`io="direct"`: O_DIRECT `preadv` of 4 KiB-aligned chunks
from a thread pool); first-use xxh3_64 verification (`verify="first-use"`); `Faults`, the
fault-injection hooks of the tests.
Does not own: host buffers and their registration with the GPU (hostmem.py), which blocks are
resident where (ram.py, vram.py, cache.py) nor the layout's manifest (disk.py / format.py).

Every failure names the layer, expert, file and offset and says what to do; nothing retries
silently and nothing waits without a bound (each read is one finite syscall per chunk).
"""
from __future__ import annotations

import errno
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

from tiered.layout.format import ALIGN  # O_DIRECT needs 4 KiB-aligned file offsets, sizes and buffer addresses
from tiered.store.hostmem import as_memoryview
from tiered.store.options import IO_MODES, VERIFY_MODES


class ExpertReadError(RuntimeError):
    """An expert block could not be read, or its bytes do not match the layout's checksum."""


@dataclass
class Faults:
    """Test hooks: make the read of a (layer, expert) fail. Kinds: "eio", "short", "corrupt"."""

    plan: dict[tuple[int, int], str] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockRef:
    """Where one expert block lives."""

    layer: int
    expert: int
    path: Path
    offset: int  # bytes from the start of `path`
    size: int  # bytes (the block size, a multiple of 4 KiB)
    xxh3: str  # xxh3_64 hex of the whole block

    def where(self) -> str:
        return f"layer {self.layer} expert {self.expert} ({self.size} bytes at offset {self.offset} of {self.path})"


class BlockReader:
    """Reads expert blocks of one layout into host buffers; verifies each block on first use.

    Args:
        layout: an opened `Layout`.
        io: "mmap" (page cache) or "direct" (O_DIRECT).
        verify: "first-use" or "none".
        threads: reader threads (parallel chunks: queue depth for the disk, or page-cache copies).
        chunk_bytes: bytes per read request (a multiple of 4 KiB).
        faults: test hooks.
    """

    def __init__(self, layout: Any, *, io: str = "mmap", verify: str = "first-use", threads: int = 8,
                 chunk_bytes: int = 4 << 20, faults: Faults | None = None) -> None:
        if io not in IO_MODES:
            raise ValueError(f"--io must be one of {IO_MODES}, got {io!r}")
        if verify not in VERIFY_MODES:
            raise ValueError(f"--verify must be one of {VERIFY_MODES}, got {verify!r}")
        if chunk_bytes % ALIGN or chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGN}, got {chunk_bytes}")
        self.layout = layout
        self.io = io
        self.verify = verify
        self.faults = faults or Faults()
        self.chunk_bytes = chunk_bytes
        self.num_experts = layout.config.num_experts
        self.block_size = layout.block_size
        self._verified: set[int] = set()  # keys whose checksum passed
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tiered-io")
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0  # bytes moved out of the file (page cache or disk)
        self.blocks_read = 0
        self.read_s = 0.0  # wall time with at least one read in flight
        self.verify_s = 0.0  # seconds spent hashing (summed over threads)
        self.verified_blocks = 0
        self._inflight = 0
        self._busy_since = 0.0
        self._mapped: torch.Tensor | None = None

    # --- plumbing ---
    def ref(self, key: int) -> BlockRef:
        layer, expert = divmod(key, self.num_experts)
        path, off, size, xxh = self.layout.block_offset(layer, expert)
        return BlockRef(layer, expert, Path(path), int(off), int(size), str(xxh))

    def mapped_row(self, key: int) -> torch.Tensor:
        """uint8 [block_size] view of the block in the mmap of experts.bin (read-only; no copy)."""
        if self._mapped is None:
            self._mapped = self.layout.expert_file_pool()
        return self._mapped[key]

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            flags = os.O_RDONLY | (os.O_DIRECT if self.io == "direct" else 0)
            try:
                fd = os.open(path, flags)
            except OSError as e:
                if self.io == "direct" and e.errno == errno.EINVAL:
                    raise ExpertReadError(f"{path}: this filesystem refuses O_DIRECT (tmpfs does): "
                                          "use --io mmap, or keep the layout on a disk filesystem") from e
                raise ExpertReadError(f"cannot open {path}: {e.strerror}: check the layout path and permissions") from e
            self._fds[path] = fd
        return fd

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # --- reads ---
    def _read_chunk(self, ref: BlockRef, dest: torch.Tensor, start: int, n: int) -> None:
        """preadv of bytes [start, start+n) of the block into dest[start:start+n]; full or raise."""
        fault = self.faults.plan.get((ref.layer, ref.expert))
        fd = self._fd(ref.path)
        view = as_memoryview(dest[start:start + n])
        done = 0
        while done < n:  # a buffered read may legally return less than asked: continue where it stopped
            try:
                if fault == "eio":
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                got = os.preadv(fd, [view[done:]], ref.offset + start + done)
                if fault == "short":
                    got = min(got, max(0, (n - done) // 2 - 1)) if done == 0 else 0
            except OSError as e:
                raise ExpertReadError(
                    f"{ref.where()}: read failed at offset {ref.offset + start + done}: {e.strerror} "
                    f"(errno {e.errno}); the disk or the file is damaged: run `tiered verify {self.layout.path}` "
                    "and re-run `tiered repack --force` if it reports bad blocks") from e
            if got <= 0 or (self.io == "direct" and got < n - done):  # O_DIRECT is short only at EOF
                raise ExpertReadError(
                    f"{ref.where()}: short read, got {done + max(got, 0)} of {n} bytes at offset {ref.offset + start}: "
                    f"the file was truncated or is being rewritten; re-run `tiered repack --force` "
                    f"and check with `tiered verify {self.layout.path}`")
            done += got

    def read_into(self, key: int, dest: torch.Tensor) -> None:
        """Read block `key` into `dest` (uint8 [block_size], host; 4 KiB aligned for direct). Blocking."""
        self.submit(key, dest).result()

    def submit(self, key: int, dest: torch.Tensor) -> Future:
        """Start reading block `key` into `dest` on the thread pool; the future raises ExpertReadError.

        The caller must not touch `dest` until the future is done (it must wait even on error,
        since other chunks may still be writing).
        """
        ref = self.ref(key)
        if dest.numel() != self.block_size or dest.device.type != "cpu":
            raise ValueError(f"{ref.where()}: destination must be a host uint8 [{self.block_size}] tensor")
        if self.io == "direct" and dest.data_ptr() % ALIGN:
            raise ValueError(f"{ref.where()}: O_DIRECT needs a {ALIGN}-byte aligned buffer, got {dest.data_ptr():#x}")
        self._busy(+1)
        out: Future = Future()
        out.set_running_or_notify_cancel()
        n_chunks = -(-ref.size // self.chunk_bytes)
        state = {"left": n_chunks, "err": None}

        def finish(c: Future) -> None:
            with self._lock:
                if c.exception() is not None and state["err"] is None:
                    state["err"] = c.exception()
                state["left"] -= 1
                if state["left"]:
                    return
            err = state["err"]
            if err is None:
                try:
                    self._after_read(ref, key, dest)
                except ExpertReadError as e:
                    err = e
            self._busy(-1, ref.size if err is None else 0)
            if err is not None:
                out.set_exception(err)
            else:
                out.set_result(None)

        for s in range(0, ref.size, self.chunk_bytes):
            self._pool.submit(self._read_chunk, ref, dest, s, min(self.chunk_bytes, ref.size - s)).add_done_callback(finish)
        return out

    def _busy(self, d: int, nbytes: int = 0) -> None:
        """Track the wall time during which at least one read is in flight (for the tier's GB/s)."""
        with self._lock:
            now = time.perf_counter()
            if d > 0 and self._inflight == 0:
                self._busy_since = now
            self._inflight += d
            if d < 0:
                self.bytes_read += nbytes
                self.blocks_read += 1 if nbytes else 0
                if self._inflight == 0:
                    self.read_s += now - self._busy_since

    def _after_read(self, ref: BlockRef, key: int, dest: torch.Tensor) -> None:
        if self.faults.plan.get((ref.layer, ref.expert)) == "corrupt":
            dest[ref.size // 2] ^= 0xFF
        if self.verify == "first-use" and key not in self._verified:
            self.check(ref, key, as_memoryview(dest))

    def check(self, ref: BlockRef, key: int, data: Any) -> None:
        """Compare the block's xxh3_64 with the manifest's; record the key as verified."""
        t0 = time.perf_counter()
        got = xxhash.xxh3_64(data).hexdigest()
        dt = time.perf_counter() - t0
        with self._lock:
            self.verify_s += dt
        if got != ref.xxh3:
            raise ExpertReadError(
                f"{ref.where()}: checksum mismatch, xxh3_64 {got} but the manifest says {ref.xxh3}: "
                f"the layout is corrupt; run `tiered verify {self.layout.path}` to list bad blocks and "
                "rebuild it with `tiered repack SRC DST --force`")
        with self._lock:
            self._verified.add(key)
            self.verified_blocks += 1

    def verify_mapped(self, key: int) -> None:
        """First-use check of a block that is used straight from the mmap (registered or CPU pass-through)."""
        if self.verify == "none" or key in self._verified:
            return
        ref = self.ref(key)
        fault = self.faults.plan.get((ref.layer, ref.expert))
        if fault in ("eio", "short"):  # what a failing page-in of a mapping would surface as
            raise ExpertReadError(f"{ref.where()}: read failed while paging in the mapped block "
                                  f"({'EIO' if fault == 'eio' else 'file shorter than the block'}); "
                                  f"run `tiered verify {self.layout.path}` and re-run `tiered repack --force`")
        data = memoryview(self.layout.block_bytes(ref.layer, ref.expert))
        if fault == "corrupt":
            data = bytearray(data)
            data[ref.size // 2] ^= 0xFF
        self.check(ref, key, data)

    def submit_mapped_check(self, key: int) -> Future:
        """verify_mapped(key) on the reader's threads (the first touch of the mapped block faults its pages in
        there too); an already-done future when there is nothing to check. The future raises ExpertReadError."""
        if self.verify == "none" or key in self._verified:
            out: Future = Future()
            out.set_result(None)
            return out
        return self._pool.submit(self.verify_mapped, key)

    def note_mapped_read(self, nbytes: int, seconds: float) -> None:
        """Count bytes that came from the file without read_into (registration, pass-through copies)."""
        with self._lock:
            self.bytes_read += nbytes
            self.blocks_read += 1
            self.read_s += seconds
