"""The mailbox through which a captured decode step hands misses to the CPU: page-locked memory both sides write.

Owns: `CpuMailbox` (the shared tensors, the native worker thread that serves them, its round-trip probe and its
counters) and the host side of the handshake (`post`, `wait`: what the eager CPU step runs, and the reference the
device kernels follow).
Does not own: which misses go to the CPU (kernels/slot_table.resolve, by the cost model's table), the device side
of the handshake (kernels/cpu_handoff.py), the expert math (kernels/cpu_kernel.c, `tiered_cpu_serve` and the kernel
it shares with the host path), nor where the result is added (moe.expert_mix's `partial`).

The protocol (one layer at a time; every layer of a step that sends no miss to the CPU skips it):
  1. the step writes the jobs' RAM rows (rows int64 [K], -1 = not a job), their routing weights (wts fp32 [K]) and
     the layer's normed input (x [D], compute dtype), then, after a system-scope fence, a new number into ctl[0];
  2. the worker thread (`tiered_cpu_serve`, spinning on ctl[0]) computes sum_j w_j * expert_j(x) from the RAM
     tier's blocks in place, writes y [D] and then (release) the same number into ctl[1];
  3. the step waits until ctl[1] holds its number, reads y and adds it after the layer's device experts.
On CUDA the tensors are page-locked and the kernels read and write them over PCIe (UVA): no host round trip, so
the step stays one CUDA graph. ctl[2] stops the worker; ctl[3] holds the kernel's last error code.
The worker spins while posts keep coming and sleeps between looks after `spin_s` without one (a core is busy
only while decoding).

Legend: K top-k, D hidden.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import torch
from torch import Tensor

from tiered.kernels.cpu_kernel import ROUND, CpuKernel, KernelUnavailable

# probe_device's device sleep before each timed round trip: about 0.5 ms at the H200's 1.98 GHz, more than the host
# takes to enqueue the post and wait kernels from Python
SLEEP_CYCLES = 1_000_000


class CpuMailbox:
    """The mailbox of one expert pool view (`W`: the RAM tier's blocks, rows = host rows of the device table).

    Args:
        kernel: the loaded native kernel (kernels/cpu_kernel.py); its plan of W must exist (a supported format).
        W: the pool view the rows index (ExpertWeights over the pinned RAM tier).
        K: top-k (the jobs' slots in the mailbox). D: hidden size. dtype: compute dtype (x, y).
        threads: the worker's OpenMP threads (--cpu-threads). fp32_weights: keep the routing weights in fp32
        (else rounded to the compute dtype, as the device path rounds them).
        pin: page-lock the tensors (CUDA: the step's kernels read and write them over PCIe).
        spin_s / sleep_s: the worker's idle policy (spin this long after a post, then sleep this long per look).
        block_bytes: one expert's block (the rate `probe_device` reports).
        cpus: pin team thread t to CPU cpus[t % len(cpus)] (store/offload.worker_cpus); None or []: unpinned.
    """

    def __init__(self, kernel: CpuKernel, W: Any, *, K: int, D: int, dtype: torch.dtype, threads: int,
                 fp32_weights: bool = False, pin: bool = False, spin_s: float = 0.02,
                 sleep_s: float = 20e-6, block_bytes: int = 0, cpus: list[int] | None = None) -> None:
        plan = kernel._plan(W)
        if plan is None:
            raise KernelUnavailable("the native CPU kernel does not read this expert format (fp8, mxfp4, biases)")
        if dtype not in ROUND:
            raise KernelUnavailable(f"the native CPU kernel does not compute in {dtype}")
        if plan.D != D:
            raise ValueError(f"the experts' hidden size is {plan.D}, the mailbox's {D}")
        self.kernel, self.W, self.plan = kernel, W, plan
        self.K, self.D, self.dtype = int(K), int(D), dtype
        self.threads = int(threads)
        self.fp32_weights = bool(fp32_weights)
        self.ctl = torch.zeros(4, dtype=torch.int32, pin_memory=pin)
        self.rows = torch.full((K,), -1, dtype=torch.int64, pin_memory=pin)
        self.wts = torch.zeros(K, dtype=torch.float32, pin_memory=pin)
        self.x = torch.zeros(D, dtype=dtype, pin_memory=pin)
        self.y = torch.zeros(D, dtype=dtype, pin_memory=pin)
        # layers, experts, ns computing, ns post seen -> done, threads pinned
        self.stat = torch.zeros(5, dtype=torch.int64)
        self.cpus = [int(c) for c in cpus or []]
        self._cpus = torch.tensor(self.cpus or [0], dtype=torch.int32)
        self._taken = (0, 0)  # stat[2], stat[0] at the last take_times
        self.spin_s, self.sleep_s = float(spin_s), float(sleep_s)
        self.rc: int | None = None
        self._seq = 0  # the host side's post number (post / wait)
        self._thread: threading.Thread | None = None
        self.overhead_s: float | None = None  # a one-expert round trip beyond its compute (`probe`, `probe_device`)
        self.gbps: float | None = None  # one expert's bytes / its compute time, the worker alone (`probe_device`)
        self.probe_rows: list[int] | None = None  # the RAM rows `probe_device` last timed
        self.block_bytes = int(block_bytes)

    # --- the worker ---
    def start(self) -> "CpuMailbox":
        if self._thread is not None:
            return self
        self.ctl[2] = 0
        self.rc = None
        p = self.plan
        fn = self.kernel.serve_fn

        def serve() -> None:  # ctypes releases the GIL for the whole loop
            self.rc = int(fn(self.ctl.data_ptr(), self.rows.data_ptr(), self.wts.data_ptr(), self.x.data_ptr(),
                             self.y.data_ptr(), self.K, p.fmt, p.base, p.stride, int(not self.fp32_weights), p.D,
                             p.F, p.gi, p.gf, self.kernel.mode(self.dtype), self.threads, self.stat.data_ptr(),
                             int(self.spin_s * 1e9), int(self.sleep_s * 1e9), self._cpus.data_ptr(),
                             len(self.cpus)))

        self._thread = threading.Thread(target=serve, name="tiered-cpu-mailbox", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker (it finishes a job in flight first)."""
        if self._thread is None:
            return
        self.ctl[2] = 1
        self._thread.join()
        self._thread = None
        if self.rc not in (0, None):
            raise RuntimeError(f"the CPU expert mailbox worker ended with code {self.rc}")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the host side of the handshake (the eager step; the device kernels do the same) ---
    def post(self, x: Tensor, rows: Tensor, wts: Tensor) -> bool:
        """Hand one layer's CPU jobs to the worker: x [1, D] or [D] (compute dtype), rows int64 [K] (RAM rows, -1 =
        none, <= -2 a split job: the rows encoding of kernels/slot_table.resolve), wts fp32 [K]. Returns False
        (nothing posted) when no row is a job."""
        if not bool((rows != -1).any()):
            return False
        self.rows.copy_(rows)
        self.wts.copy_(wts.reshape(-1).to(torch.float32))
        self.x.copy_(x.reshape(-1))
        self._seq = int(self.ctl[0]) % 0x7FFFFFFF + 1  # the count device posts share (kernels/cpu_handoff)
        self.ctl[0] = self._seq
        return True

    def wait(self, out: Tensor, posted: bool, *, timeout_s: float = 30.0) -> Tensor:
        """out [1, D] <- the posted layer's y (zero when nothing was posted), once the worker has answered."""
        if not posted:
            return out.zero_()
        t0 = time.perf_counter()
        while int(self.ctl[1]) != self._seq:
            if not self.running:
                raise RuntimeError(f"the CPU expert mailbox worker is not running (code {self.rc})")
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"the CPU expert mailbox worker did not answer post {self._seq} in {timeout_s} s")
            time.sleep(0)
        if int(self.ctl[3]):
            raise RuntimeError(f"the CPU expert kernel failed with code {int(self.ctl[3])}")
        return out.copy_(self.y.view(1, -1))

    # --- measurement and stats ---
    def probe(self, rows: list[int], repeats: int = 5) -> float:
        """The fixed cost of a round trip (post, worker wake-up and its thread team, answer) beyond the compute of
        one expert at RAM row rows[0]: the best of `repeats`, from the host side. Sets `overhead_s`."""
        x = torch.zeros(1, self.D, dtype=self.dtype)
        r = torch.full((self.K,), -1, dtype=torch.int64)
        w = torch.zeros(self.K, dtype=torch.float32)
        out = torch.empty(1, self.D, dtype=self.dtype)
        best = float("inf")
        for i in range(repeats + 1):
            r[0] = rows[i % len(rows)]
            ns0 = int(self.stat[2])
            t0 = time.perf_counter()
            self.wait(out, self.post(x, r, w))
            dt = time.perf_counter() - t0 - (int(self.stat[2]) - ns0) * 1e-9
            if i:  # the first wakes the worker from its idle sleep
                best = min(best, dt)
        self.overhead_s = max(best, 0.0)
        return self.overhead_s

    def probe_device(self, rows: list[int], device: torch.device, repeats: int = 9) -> tuple[float, float]:
        """The round trip as a captured step sees it: the device's post and wait kernels (kernels/cpu_handoff.py)
        around a one-expert job at RAM row rows[i], timed with CUDA events from after a device sleep that covers
        the host's launches. Sets `overhead_s` (the median round trip beyond the worker's compute: PCIe writes, the
        worker's notice, the answer's poll and read) and `gbps` (the expert's bytes / the median compute time, the
        worker alone). Medians, not the best: the best of five lone experts read 46-73 GB/s in runs of one session
        (13) on the H200 box, whose worker then averaged 49-55 in the step, and a cost model that thinks the CPU
        faster than it is sends a layer's lone miss there, which is then not admitted (nextuse+cpu 473-483 tok/s
        with take[1] = 1 against 495-523 with 0, sessions 11-13). Returns (overhead_s, gbps)."""
        from tiered.kernels import cpu_handoff  # the device side of this mailbox

        K, D = self.K, self.D
        x = torch.zeros(1, D, dtype=self.dtype, device=device)
        w = torch.zeros(K, dtype=torch.float32, device=device)
        r = torch.full((K,), -1, dtype=torch.int64, device=device)
        seq = torch.zeros(3, dtype=torch.int32, device=device)
        out = torch.empty(1, D, dtype=self.dtype, device=device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        overs, comps = [], []
        for i in range(repeats + 1):
            r.fill_(-1)
            r[0] = rows[i % len(rows)]
            torch.cuda.synchronize(device)
            ns0 = int(self.stat[2])
            # the device sleeps while the host enqueues the kernels, so that their launch (tens of us of Python,
            # which a captured step never pays) is not timed as the round trip's fixed cost
            torch.cuda._sleep(SLEEP_CYCLES)
            e0.record()
            cpu_handoff.post(x, w, r, seq, self)
            cpu_handoff.wait(seq, self, out)
            e1.record()
            e1.synchronize()
            cpu_handoff.check(seq)
            c = (int(self.stat[2]) - ns0) * 1e-9
            if i:  # the first wakes the team from its idle sleep
                overs.append(e0.elapsed_time(e1) * 1e-3 - c)
                comps.append(c)
        over, comp = statistics.median(overs), statistics.median(comps)
        self.probe_rows = list(rows)
        self.overhead_s = max(over, 0.0)
        self.gbps = self.block_bytes / comp / 1e9 if comp > 0 and self.block_bytes else None
        return self.overhead_s, self.gbps

    def take_times(self) -> tuple[float, int]:
        """Seconds computing and layers served since the last call (the stats fold them in)."""
        ns, layers = int(self.stat[2]), int(self.stat[0])
        d = ((ns - self._taken[0]) * 1e-9, layers - self._taken[1])
        self._taken = (ns, layers)
        return d

    def stats(self) -> dict:
        n, ns = int(self.stat[1]), int(self.stat[2])
        return {"layers": int(self.stat[0]), "experts": n, "compute_s": ns * 1e-9,
                "turnaround_s": int(self.stat[3]) * 1e-9, "threads": self.threads,
                "overhead_s": self.overhead_s, "cpus": self.cpus, "pinned": int(self.stat[4])}

