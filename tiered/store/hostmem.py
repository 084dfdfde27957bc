"""Host memory the tiers copy through: 4 KiB-aligned buffers (page-locked on CUDA) and cudaHostRegister.

Owns: `aligned_empty` (an aligned host buffer, pinned when asked, unpinned when collected), `HostRegistrar`
(cudaHostRegister / Unregister of mapped blocks, flag 8 = cudaHostRegisterReadOnly; flag 2 once poisoned
the CUDA context on the H200 box), `clear_cuda_error`, and `as_memoryview` (a CPU tensor's bytes).
Does not own: reads from disk (io.py), nor what the buffers hold (ram.py, vram.py).
"""
from __future__ import annotations

import ctypes
import mmap
import weakref
from typing import Any

import torch

from tiered.layout.format import ALIGN


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page


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
        huge = nbytes >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE")
        # A buffer of a huge page or more starts on a huge page boundary (the mapping is one huge page longer; the
        # pages before the start are never touched, so never backed) and asks for transparent huge pages, for the
        # CPU experts that stream the RAM tier's blocks (fewer page walks). On the H200 box it took (9 GiB in huge
        # pages) but measured neutral end to end (session 13, offload-cpu-probe-thp-2026-12-02-h200-s13.json).
        self.map = mmap.mmap(-1, max(nbytes, ALIGN) + (HUGE_PAGE if huge else 0),  # private: shared anonymous
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # memory is shmem, which THP skips
        whole = torch.frombuffer(self.map, dtype=torch.uint8)
        start = -whole.data_ptr() % HUGE_PAGE if huge else 0
        for advice in ([mmap.MADV_HUGEPAGE] if huge else []) + [getattr(mmap, "MADV_DONTFORK", None)]:
            # DONTFORK: a forked child would copy page-locked private pages (gigabytes); none of ours needs them
            try:
                if advice is not None:
                    self.map.madvise(advice, start, len(self.map) - start)
            except OSError:  # THP compiled out: 4 KiB pages, as without the advice
                pass
        self.tensor = whole[start:start + nbytes]  # uint8 [nbytes]
        self._pinned: set[int] = set()
        if pin:
            # torch's pinned allocator rounds sizes up to a power of two (a 19 GiB pool would lock
            # 32 GiB); registering an exact-size range locks only what is asked for.
            code = HostRegistrar.register_raw(self.tensor.data_ptr(), max(nbytes, ALIGN), 0)
            if code:
                raise RuntimeError(f"cudaHostRegister of a {nbytes / 2**30:.2f} GiB host buffer failed (CUDA error "
                                   f"{code}): lower --ram-gb, or raise the locked-memory limit (ulimit -l)")
            self._pinned.add(self.tensor.data_ptr())
            weakref.finalize(self, _unpin, self._pinned, self.map)

    @property
    def registered(self) -> bool:
        return bool(self._pinned)

    def release(self) -> None:
        """Unpin (after the device's last use) and give the pages back to the system now, whoever still holds the
        tensor (it reads zeros afterwards): a closed cache's RAM tier (gigabytes) must not wait for the garbage
        collector, which a caller's frame or a reference cycle can hold off for several engine loads."""
        if self._pinned:
            torch.cuda.synchronize()
            _unpin(self._pinned)
        try:
            self.map.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError, AttributeError):  # closed, or no madvise here: the collector frees it later
            pass


def aligned_empty(nbytes: int, *, pin: bool) -> tuple[torch.Tensor, Any]:
    """A uint8 [nbytes] host tensor, 4 KiB aligned (O_DIRECT); page-locked when `pin`.

    Returns (tensor, owner); keep `owner` alive as long as the tensor, and call owner.release()
    to unpin before dropping it (it also returns the pages to the system: the tensor then reads zeros).
    """
    owner = _HostBuffer(nbytes, pin)
    t = owner.tensor
    if t.data_ptr() % ALIGN:
        raise RuntimeError(f"host buffer at {t.data_ptr():#x} is not {ALIGN}-byte aligned; O_DIRECT needs it")
    return t, owner


def as_memoryview(t: torch.Tensor) -> memoryview:
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
