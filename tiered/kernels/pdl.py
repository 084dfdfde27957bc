"""Programmatic dependent launch (PDL, Hopper and later): a kernel's programs start while the kernel before it in
the stream is still finishing, and wait for it only where they read its results.

Owns: `launch_args(device)` (the extra launch arguments of a decode kernel: {"GDC": True, "launch_pdl": True} where
PDL is on, else {}), `gdc_enter` (the kernels' first statement: with GDC, wait until the previous kernel of the
stream has completed and its writes are visible, then let the next kernel launch), `l2_prefetch` (what may run
before that wait: an L2 prefetch of data the previous kernel does not write, e.g. a dense GEMV's weights in
quant_moe._qgemv), `pdl_enabled(device)` and `preload_enabled()`.
Does not own: the kernels (each adds a `GDC: tl.constexpr = False` parameter and calls gdc_enter(GDC) first).

Why: a one-token decode step is about 110 launches of a few microseconds each (notes/Q4_DECODE.md); between two
kernels the GPU drains the first one's last programs, then launches and ramps up the next. With PDL the next
kernel is launched while the first one's last wave runs (each program calls griddepcontrol.launch_dependents
right after its wait), so its launch, scheduling and prologue overlap the tail. Every kernel launched with PDL
waits (griddepcontrol.wait) before any read or write, in every program, so ordering is transitive: kernel C
waiting for B implies A, which B waited for, has completed too. Kernels launched without the attribute (torch's,
cuBLAS) keep the ordinary stream order. CUDA graphs capture the attribute as a programmatic edge (CUDA 12.3+).

Switches: TIERED_PDL=0 turns it off (the benchmarks time both); it is on where the device is CUDA of compute
capability 9.0 or later and Triton has the griddepcontrol intrinsics (3.4+), never under the interpreter.
TIERED_PDL_PREFETCH=1 adds the dense GEMV's L2 prefetch before the wait (off: it measured 1% slower).
TIERED_PRELOAD=0 stops the q4 kernels' and the attention split kernel's loads before the wait (on by default; see
preload_enabled).
What may be read before the wait: data no kernel of the step writes (weights), and data written two or more kernels
back: a PDL-aware kernel lets its dependents launch only after its own wait, so when kernel C starts, the kernel
before B has completed and its writes are visible. Data the previous kernel writes is read after the wait only.
One kernel skips its wait on purpose: the experts' gate_up after the device step's overlapped gather
(moe_decode.Landing) reads the gather's rows through per-row counts (a release in the gather, an acquire in the
waiting program) and everything else from before the gather; it lets its dependents launch at once, and the down
kernel's wait covers it (gate_up completes only after every copied row it needs has landed).
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU torch wheel without triton
    triton = None
    tl = None

ENV = "TIERED_PDL"
PREFETCH_ENV = "TIERED_PDL_PREFETCH"
PRELOAD_ENV = "TIERED_PRELOAD"


def _triton_has_gdc() -> bool:
    try:
        from triton.language.extra import cuda as tl_cuda
    except ImportError:  # pragma: no cover
        return False
    return hasattr(tl_cuda, "gdc_wait") and hasattr(tl_cuda, "gdc_launch_dependents")


@functools.lru_cache(maxsize=None)
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and _triton_has_gdc()


def pdl_enabled(device: torch.device) -> bool:
    """Whether decode kernels on `device` launch with PDL (TIERED_PDL=0 turns it off)."""
    if device.type != "cuda" or os.environ.get(ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        return False
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return False
    return _device_ok(device.index if device.index is not None else torch.cuda.current_device())


def l2_prefetch_enabled() -> bool:
    """Whether PDL-launched dense GEMVs prefetch their weights into L2 before the wait: off unless
    TIERED_PDL_PREFETCH=1. Measured on the H200 (benchmarks/results/quant-2026-12-01-h200-s8.json), the q4+q4
    decode of the 10.6B shape gained nothing: 2,176-2,186 tok/s with it, 2,197-2,209 without (or with one line a
    row)."""
    return os.environ.get(PREFETCH_ENV, "0").strip().lower() in ("1", "on", "true", "yes")


def preload_enabled() -> bool:
    """Whether PDL-launched kernels load what the previous kernel does not write (a dense GEMV's first step of weights,
    the expert down kernel's slots and codes, the attention's older keys and values) into registers before their
    wait: on unless TIERED_PRELOAD=0. The router kernel (fused_route) always does; this switch serves quant_moe's
    kernels and the attention's split kernel, and lets a benchmark time both."""
    return os.environ.get(PRELOAD_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def launch_args(device: torch.device) -> dict:
    """The extra arguments of a PDL-aware kernel's launch on `device`: {} when PDL is off."""
    return {"GDC": True, "launch_pdl": True} if pdl_enabled(device) else {}


def _gdc_enter(GDC: tl.constexpr):
    """First statement of a PDL-aware kernel: wait for the previous kernel, then let the next one launch."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _l2_prefetch(ptrs):
    """Ask L2 for the 128-byte lines at `ptrs` (a tensor of global pointers; valid addresses): no value comes back,
    nothing waits. What a PDL-launched kernel can do before its wait with data that does not depend on the
    previous kernel (its weights)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


gdc_enter = None
l2_prefetch = None
if triton is not None:
    gdc_enter = triton.jit(_gdc_enter)
    l2_prefetch = triton.jit(_l2_prefetch)
