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
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any, Callable

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


class _Workers:
    """A fixed set of reader threads fed by one queue: a job is a plain call, no Future per job (a block's chunks
    report to the block's own completion, so the calling thread allocates nothing per chunk). Threads start on
    the first job."""

    def __init__(self, n: int) -> None:
        self.n = max(1, n)
        self._q: SimpleQueue = SimpleQueue()
        self._threads: list[threading.Thread] = []

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job reports its own errors; the thread must outlive a bug
                pass
            job = None  # an idle thread holds no job (whose closure holds its reader)

    def submit(self, job: Callable[[], None]) -> None:
        if not self._threads:
            self._threads = [threading.Thread(target=self._run, name=f"tiered-io-{i}", daemon=True)
                             for i in range(self.n)]
            for t in self._threads:
                t.start()
        self._q.put(job)

    def call(self, fn: Callable[..., Any], *args: Any) -> Future:
        """fn(*args) on a reader thread, as a Future."""
        out: Future = Future()
        out.set_running_or_notify_cancel()

        def job() -> None:
            try:
                out.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                out.set_exception(e)

        self.submit(job)
        return out

    def stop(self) -> None:
        """Ask every thread to exit once the queued jobs are done (no wait: safe from a finalizer)."""
        for _ in self._threads:
            self._q.put(None)

    def shutdown(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._q.put(None)
        for t in threads:
            t.join()


class BlockReader:
    """Reads expert blocks of one layout into host buffers; verifies each block on first use.

    Args:
        layout: an opened `Layout`.
        io: "mmap" (page cache) or "direct" (O_DIRECT).
        verify: "first-use" or "none".
        threads: reader threads (parallel chunks: queue depth for the disk, or page-cache copies).
        chunk_bytes: bytes per read request (a multiple of 4 KiB). The first-use hash trails the reads by about
            one chunk, so smaller chunks finish a block's check sooner after its last byte lands; 2 MiB keeps
            requests large for the disk and the reader threads' work per chunk small against the copy.
        faults: test hooks.
    """

    def __init__(self, layout: Any, *, io: str = "mmap", verify: str = "first-use", threads: int = 8,
                 chunk_bytes: int = 2 << 20, faults: Faults | None = None) -> None:
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
        self._refs: dict[int, BlockRef] = {}  # key -> where its block lives (filled on first use)
        self._lock = threading.Lock()
        self._pool = _Workers(threads)
        weakref.finalize(self, self._pool.stop)  # a reader dropped without close() does not leave threads behind
        self._paths: dict[str, Path] = {}
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
        r = self._refs.get(key)
        if r is None:  # made once per block: a miss then costs no manifest lookup nor path parsing
            layer, expert = divmod(key, self.num_experts)
            path, off, size, xxh = self.layout.block_offset(layer, expert)
            p = self._paths.get(str(path)) or self._paths.setdefault(str(path), Path(path))
            r = self._refs[key] = BlockRef(layer, expert, p, int(off), int(size), str(xxh))
        return r

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
        self._pool.shutdown()
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
        if fault == "corrupt" and start <= ref.size // 2 < start + n:  # one flipped byte, as on a bad disk
            dest[ref.size // 2] ^= 0xFF

    def read_into(self, key: int, dest: torch.Tensor) -> None:
        """Read block `key` into `dest` (uint8 [block_size], host; 4 KiB aligned for direct). Blocking."""
        self.submit(key, dest).result()

    def submit(self, key: int, dest: torch.Tensor) -> Future:
        """Start reading block `key` into `dest` on the thread pool; the future raises ExpertReadError.

        The block is read in chunks of `chunk_bytes` on the reader's threads. With a first-use check due, the
        block's xxh3_64 is fed chunk by chunk, in file order, by whichever thread completes the next chunk in
        order: the hash runs while later chunks are still being read, on bytes still in that core's cache, and
        the future completes about one chunk's hash after the last read lands (not one whole block's).
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
        cb = self.chunk_bytes
        n_chunks = -(-ref.size // cb)
        hasher = xxhash.xxh3_64() if self.verify == "first-use" and key not in self._verified else None
        view = as_memoryview(dest) if hasher is not None else None
        lock = threading.Lock()
        # left: chunks not landed; landed: which have; next: the first chunk not hashed; hashing: a thread is
        # feeding the hash; hash_s: seconds spent hashing this block
        st = {"left": n_chunks, "err": None, "landed": [False] * n_chunks, "next": 0, "hashing": False,
              "hash_s": 0.0}

        def finish() -> None:
            err = st["err"]
            if err is None and hasher is not None:
                with self._lock:
                    self.verify_s += st["hash_s"]
                err = self._compare(ref, key, hasher.hexdigest())
            self._busy(-1, ref.size if err is None else 0)
            if err is not None:
                out.set_exception(err)
            else:
                out.set_result(None)

        def landed(i: int, err: BaseException | None) -> None:
            with lock:
                if err is not None and st["err"] is None:
                    st["err"] = err
                st["left"] -= 1
                st["landed"][i] = True
                if hasher is None or st["err"] is not None:  # nothing to hash: the last chunk finishes the block
                    if st["left"] or st["hashing"]:
                        return
                    last = True
                else:
                    if st["hashing"]:  # the thread feeding the hash will take this chunk too
                        return
                    st["hashing"] = True
                    last = False
            if not last:
                while True:  # feed the landed chunks in order, without the lock
                    with lock:
                        j = st["next"]
                        if st["err"] is not None or j == n_chunks or not st["landed"][j]:
                            st["hashing"] = False
                            if st["left"] or (st["err"] is None and j < n_chunks):
                                return  # chunks still in flight: the thread landing the next one continues
                            break
                        st["next"] = j + 1
                    t0 = time.perf_counter()
                    hasher.update(view[j * cb:min(ref.size, (j + 1) * cb)])
                    st["hash_s"] += time.perf_counter() - t0
            finish()

        def chunk(i: int, start: int) -> None:
            err = None
            try:
                self._read_chunk(ref, dest, start, min(cb, ref.size - start))
            except BaseException as e:  # noqa: BLE001 - recorded, raised through the block's future
                err = e
            try:
                landed(i, err)
            except BaseException as e:  # noqa: BLE001 - never leave the caller waiting on a future that cannot end
                if not out.done():
                    out.set_exception(e)

        for i in range(n_chunks):
            self._pool.submit(lambda i=i: chunk(i, i * cb))
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

    def check(self, ref: BlockRef, key: int, data: Any) -> None:
        """Compare the block's xxh3_64 with the manifest's; record the key as verified."""
        t0 = time.perf_counter()
        got = xxhash.xxh3_64(data).hexdigest()
        dt = time.perf_counter() - t0
        with self._lock:
            self.verify_s += dt
        err = self._compare(ref, key, got)
        if err is not None:
            raise err

    def _compare(self, ref: BlockRef, key: int, got: str) -> ExpertReadError | None:
        """The error for a checksum that differs from the manifest's (None when equal: the key is verified)."""
        if got != ref.xxh3:
            return ExpertReadError(
                f"{ref.where()}: checksum mismatch, xxh3_64 {got} but the manifest says {ref.xxh3}: "
                f"the layout is corrupt; run `tiered verify {self.layout.path}` to list bad blocks and "
                "rebuild it with `tiered repack SRC DST --force`")
        with self._lock:
            if key not in self._verified:
                self._verified.add(key)
                self.verified_blocks += 1
        return None

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
        return self._pool.call(self.verify_mapped, key)

    def note_mapped_read(self, nbytes: int, seconds: float) -> None:
        """Count bytes that came from the file without read_into (registration, pass-through copies)."""
        with self._lock:
            self.bytes_read += nbytes
            self.blocks_read += 1
            self.read_s += seconds
