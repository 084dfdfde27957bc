"""The device side of the CPU-expert mailbox (model/cpu_mailbox.py): a captured decode step hands a layer's CPU
misses to the host's worker and takes its answer back, with no host round trip.

Owns two one-program kernels and their plain torch references (the eager CPU step runs the references):
  - `post`: when resolve sent any of the layer's misses to the CPU (cpu_row >= 0), writes their rows, routing
    weights and the layer's input x into the mailbox's page-locked tensors over PCIe, then, after a system-scope
    fence, the next post number (the mailbox's ctl[0] + 1) into ctl[0] and into seq[0] on the device.
  - `wait`: when this layer posted (seq[0] != seq[1]), polls ctl[1] (volatile loads over PCIe) until the worker
    answers with that number, then adds y to the layer's device-expert output in place (the step calls it from
    moe.expert_mix, after those experts: they run while the CPU computes); else leaves it. It gives up after
    `spin_max` looks (seq[2] = 1, nothing added: the step finishes and the host raises, instead of the GPU
    hanging).
seq int32 [3] (device): the last post number, the last one answered, a timeout flag.
Why a polling kernel (one program on one SM for the worker's compute time) and not cuStreamWaitValue32: torch
does not expose stream memory operations, and a kernel is captured like any other (not measured against it).
Does not own: the mailbox's tensors and worker (model/cpu_mailbox.py), which misses go to the CPU
(slot_table.resolve), where y is added (moe.expert_mix's `partial`).

Legend: K top-k, D hidden.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from tiered.kernels.fused_norm import interpreted
from tiered.kernels.pdl import gdc_enter, launch_args
from tiered.kernels.slot_table import HostPointer, _p2

SPIN_MAX = 1 << 23  # looks before the wait gives up: each is a PCIe read of about 1 us, so several seconds
MAX_SEQ = 0x7FFFFFFF
_MAX_SEQ = tl.constexpr(MAX_SEQ)  # (Triton reads globals only when they are constexpr instances)


@triton.jit
def _sys_fence(v):
    """A system-scope fence (orders this thread's memory operations, and those it observed, for the host too)."""
    return tl.inline_asm_elementwise("fence.sc.sys; mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=False,
                                     pack=1)


@triton.jit
def _post_kernel(x_ptr, wts_ptr, cpu_row, seq, box_rows, box_wts, box_x, ctl, n_k, D, K_P: tl.constexpr,
                 D_P: tl.constexpr, FENCE: tl.constexpr, GDC: tl.constexpr = False):
    gdc_enter(GDC)
    ok = tl.arange(0, K_P)
    mk = ok < n_k
    rows = tl.load(cpu_row + ok, mask=mk, other=-1)
    if tl.sum((rows != -1).to(tl.int32), axis=0) > 0:  # <= -2: a split job (slot_table.resolve)
        tl.store(box_rows + ok, rows, mask=mk)
        tl.store(box_wts + ok, tl.load(wts_ptr + ok, mask=mk, other=0.0), mask=mk)
        od = tl.arange(0, D_P)
        md = od < D
        tl.store(box_x + od, tl.load(x_ptr + od, mask=md, other=0.0), mask=md)
        s = tl.load(ctl, volatile=True) % _MAX_SEQ + 1  # the mailbox's own count: host posts share it
        tl.debug_barrier()  # every thread's stores above, then one fence, then the number
        if FENCE:
            s = _sys_fence(s)
        tl.store(ctl, s)
        tl.store(seq, s)


@triton.jit
def _wait_kernel(seq, ctl, box_y, out, D, spin_max, D_P: tl.constexpr, FENCE: tl.constexpr,
                 GDC: tl.constexpr = False):
    gdc_enter(GDC)
    s = tl.load(seq)
    od = tl.arange(0, D_P)
    md = od < D
    if s != tl.load(seq + 1):
        done = tl.load(ctl + 1, volatile=True)
        i = 0
        while (done != s) & (i < spin_max):
            done = tl.load(ctl + 1, volatile=True)
            i += 1
        if FENCE:
            done = _sys_fence(done)
        if done == s:
            y = tl.load(box_y + od, mask=md, other=0.0, volatile=True).to(tl.float32)
            o = tl.load(out + od, mask=md, other=0.0).to(tl.float32)
            tl.store(out + od, (o + y).to(out.dtype.element_ty), mask=md)  # torch's add: fp32, rounded once
        else:
            tl.store(seq + 2, 1)
        tl.store(seq + 1, s)


def _ptr(t: Tensor) -> Any:
    return HostPointer(t) if t.device.type == "cpu" and t.is_pinned() else t


def post(x: Tensor, wts: Tensor, cpu_row: Tensor, seq: Tensor, box: Any) -> None:
    """Layer's CPU jobs -> the mailbox `box` (x [1, D] compute dtype, wts fp32 [K], cpu_row int64 [K], on the
    step's device; seq int32 [3]); nothing when no row is a job. CUDA: the kernel; else the host side."""
    if x.device.type != "cuda":
        return post_reference(x, wts, cpu_row, seq, box)
    K, D = cpu_row.shape[0], x.shape[-1]
    _post_kernel[(1,)](x, wts, cpu_row, seq, _ptr(box.rows), _ptr(box.wts), _ptr(box.x), _ptr(box.ctl), K, D,
                       K_P=_p2(K), D_P=_p2(D), FENCE=not interpreted(), num_warps=4, **launch_args(x.device))


def wait(seq: Tensor, box: Any, out: Tensor, *, spin_max: int = SPIN_MAX) -> None:
    """out [1, D] (device, the layer's device experts) += the worker's y for this layer's post; unchanged when the
    layer posted nothing."""
    if out.device.type != "cuda":
        return wait_reference(seq, box, out)
    D = out.shape[-1]
    _wait_kernel[(1,)](seq, _ptr(box.ctl), _ptr(box.y), out, D, int(spin_max), D_P=_p2(D), FENCE=not interpreted(),
                       num_warps=4, **launch_args(out.device))


def post_reference(x: Tensor, wts: Tensor, cpu_row: Tensor, seq: Tensor, box: Any) -> None:
    """post on host values: the mailbox's host side (CpuMailbox.post), with seq kept as the kernel keeps it."""
    if box.post(x, cpu_row, wts):
        seq[0] = box._seq


def wait_reference(seq: Tensor, box: Any, out: Tensor, *, timeout_s: float = 30.0) -> None:
    """wait on host values: spins (yielding) until the worker answers seq[0], then out += y; nothing when nothing
    was posted."""
    if int(seq[0]) != int(seq[1]):
        out.add_(box.wait(torch.empty_like(out), True, timeout_s=timeout_s))
    seq[1] = seq[0]


def check(seq: Tensor) -> None:
    """Raise if a wait gave up (the worker never answered): read by the host after a step's graph (syncs)."""
    if int(seq[2]):
        raise RuntimeError("a decode step waited for the CPU expert worker in vain (it did not answer within "
                           f"{SPIN_MAX} looks): its thread is stuck or gone; rerun with --cpu-experts off")

