"""Disk-tier reads of expert blocks: page-cache reads, O_DIRECT reads, cudaHostRegister, checksums.

Owns: `BlockReader`, which moves one expert block of experts.bin into a host buffer, either
through the page cache (`io="mmap"`: buffered `preadv`, or no copy at all when the mapped block is
registered with the GPU) or around it (`io="direct"`: O_DIRECT `preadv` of 4 KiB-aligned chunks
from a thread pool); first-use xxh3_64 verification (`verify="first-use"`); `HostRegistrar`
(cudaHostRegister / Unregister of mapped blocks, flag 8 = cudaHostRegisterReadOnly; flag 2 once
poisoned the CUDA context, see GROUND.md); `Faults`, the fault-injection hooks of the tests.
Does not own: which blocks are resident where (ram.py, vram.py, cache.py) nor the layout's
manifest (disk.py / format.py).

Every failure names the layer, expert, file and offset and says what to do; nothing retries
silently and nothing waits without a bound (each read is one finite syscall per chunk).
"""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash

ALIGN = 4096  # O_DIRECT needs 4 KiB-aligned file offsets, sizes and buffer addresses
IO_MODES = ("mmap", "direct")
VERIFY_MODES = ("first-use", "none")


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


def _unpin(ptrs: set[int], keep: Any = None) -> None:
    """Unregister host ranges at garbage collection, before their memory can be unmapped and its addresses
    reused (CUDA would refuse a later registration there: error 712). Never raises. `keep` holds the
    mapping alive until this has run."""
    for p in list(ptrs):
        try:
            if int(getattr(e := torch.cuda.cudart().cudaHostUnregister(p), "value", e)):
                clear_cuda_error()
        except Exception:  # noqa: BLE001 - interpreter shutdown, a context already gone: nothing to do
            pass
    ptrs.clear()


class _HostBuffer:
    """Owner of a page-aligned anonymous mapping, page-locked with cudaHostRegister when pinned."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        import mmap

        self.map = mmap.mmap(-1, max(nbytes, ALIGN))
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)[:nbytes]  # uint8 [nbytes]
        self._pinned: set[int] = set()
        if pin:
            # torch's pinned allocator rounds sizes up to a power of two (a 19 GiB pool would lock
            # 32 GiB); registering an exact-size mapping locks only what is asked for.
            code = HostRegistrar.register_raw(self.tensor.data_ptr(), len(self.map), 0)
            if code:
                raise RuntimeError(f"cudaHostRegister of a {nbytes / 2**30:.2f} GiB host buffer failed (CUDA error "
                                   f"{code}): lower --ram-gb, or raise the locked-memory limit (ulimit -l)")
            self._pinned.add(self.tensor.data_ptr())
            weakref.finalize(self, _unpin, self._pinned, self.map)

    @property
    def registered(self) -> bool:
        return bool(self._pinned)

    def release(self) -> None:
        if self._pinned:
            torch.cuda.synchronize()
            _unpin(self._pinned)


def aligned_empty(nbytes: int, *, pin: bool) -> tuple[torch.Tensor, Any]:
    """A uint8 [nbytes] host tensor, 4 KiB aligned (O_DIRECT); page-locked when `pin`.

    Returns (tensor, owner); keep `owner` alive as long as the tensor, and call owner.release()
    to unpin before dropping it.
    """
    owner = _HostBuffer(nbytes, pin)
    t = owner.tensor
    if t.data_ptr() % ALIGN:
        raise RuntimeError(f"host buffer at {t.data_ptr():#x} is not {ALIGN}-byte aligned; O_DIRECT needs it")
    return t, owner


def _as_memoryview(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous uint8 host tensor (no copy)."""
    assert t.dtype == torch.uint8 and t.is_contiguous() and t.device.type == "cpu"
    return memoryview((ctypes.c_char * t.numel()).from_address(t.data_ptr())).cast("B")


def _loaded_cudart() -> Any:
    """The libcudart this process already loaded (torch's), via ctypes; None if not found."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line}
    except OSError:
        paths = set()
    for p in sorted(paths):
        try:
            return ctypes.CDLL(p)
        except OSError:
            continue
    return None


def clear_cuda_error() -> None:
    """Reset CUDA's last error after a refused (non-sticky) call, so torch's next launch check does not
    report it. torch's cudart bindings lack cudaGetLastError, so it is called through ctypes."""
    fn = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
    if fn is not None:
        fn()
        return
    lib = _loaded_cudart()
    if lib is not None:
        lib.cudaGetLastError()


class HostRegistrar:
    """cudaHostRegister(ptr, n, ReadOnly) of mapped blocks, so the GPU DMAs from the page cache.

    Blocks still registered when the registrar is collected are unregistered then (see `_unpin`).
    """

    READ_ONLY = 8  # cudaHostRegisterReadOnly; 2 (IoMemory) poisoned the context on the GPU box

    def __init__(self) -> None:
        self._rt = torch.cuda.cudart()
        self._live: set[int] = set()  # registered pointers
        weakref.finalize(self, _unpin, self._live)

    def register(self, t: torch.Tensor) -> int:
        """Register `t`'s bytes read-only; returns the CUDA error code (0 = success; the error is cleared)."""
        code = self.register_raw(t.data_ptr(), t.numel(), self.READ_ONLY)
        if not code:
            self._live.add(t.data_ptr())
        return code

    @staticmethod
    def register_raw(ptr: int, nbytes: int, flags: int) -> int:
        rt = torch.cuda.cudart()
        err = rt.cudaHostRegister(ptr, nbytes, flags)
        code = int(getattr(err, "value", err))
        if code:
            clear_cuda_error()  # registration errors are not sticky: clear and fall back
        return code

    def unregister(self, t: torch.Tensor) -> None:
        self._live.discard(t.data_ptr())
        err = self._rt.cudaHostUnregister(t.data_ptr())
        code = int(getattr(err, "value", err))
        if code:
            clear_cuda_error()
            raise RuntimeError(f"cudaHostUnregister({t.data_ptr():#x}) failed with CUDA error {code}")


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
        view = _as_memoryview(dest[start:start + n])
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
            self.check(ref, key, _as_memoryview(dest))

    def check(self, ref: BlockRef, key: int, data: Any) -> None:
        """Compare the block's xxh3_64 with the manifest's; record the key as verified."""
        got = xxhash.xxh3_64(data).hexdigest()
        if got != ref.xxh3:
            raise ExpertReadError(
                f"{ref.where()}: checksum mismatch, xxh3_64 {got} but the manifest says {ref.xxh3}: "
                f"the layout is corrupt; run `tiered verify {self.layout.path}` to list bad blocks and "
                "rebuild it with `tiered repack SRC DST --force`")
        with self._lock:
            self._verified.add(key)

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

    def note_mapped_read(self, nbytes: int, seconds: float) -> None:
        """Count bytes that came from the file without read_into (registration, pass-through copies)."""
        with self._lock:
            self.bytes_read += nbytes
            self.blocks_read += 1
            self.read_s += seconds
