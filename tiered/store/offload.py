"""Where a decode miss is computed: copied to a device slot over PCIe, or computed on the CPU in place.

Owns: `CostModel` (the per-miss decision of `--cpu-experts auto`: each missing expert goes where it finishes
first, given the work already queued on each side, from the measured PCIe and CPU-expert rates), `CpuWorker`
(the one thread that computes CPU experts, with its own `torch.set_num_threads`), `cpu_threads` (the
--cpu-threads default), `worker_cpus` (the CPUs a pinned mailbox team takes, TIERED_CPU_PIN) and `CpuExpertCounts`
(the `cpu_experts` stats).
Does not own: the expert math (model/cpu_experts.py), which experts are resident (cache.py), the copies
(vram.py), nor the RAM tier's blocks (ram.py).

The decision, per layer of a one-token step (greedy over the layer's misses, in routing order):
    t_pcie = queue_pcie + bytes / pcie_gbps     (copy into a device slot; the GPU's compute is not counted)
    t_cpu  = queue_cpu  + bytes / cpu_gbps (+ cpu_overhead_s for the layer's first CPU expert)
    send the miss to the smaller, add its time to that side's queue;
but the CPU side is charged `reuse_penalty` (ADMIT_PENALTY) of a copy more: a miss computed on the CPU is not
admitted, so its next use misses again where a copied one may hit (see ADMIT_PENALTY).
queue_pcie starts at the copies still in flight (prefetches), queue_cpu at 0 (the CPU experts of a layer are
finished before the next layer starts). Prefetched experts are hits and hot experts (a predicted-eviction
score above the layer's median) are always copied: they will be reused, a CPU computation is not kept.
"""
from __future__ import annotations

import glob
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from tiered.store.options import physical_cores


def cpu_threads(n: int) -> int:
    """--cpu-threads: n, or the physical cores when n is 0 (options.physical_cores)."""
    return int(n) if n and n > 0 else physical_cores()


CPU_PIN_ENV = "TIERED_CPU_PIN"


def cpu_pin_enabled() -> bool:
    """TIERED_CPU_PIN (a benchmark's knob): "1" pins the device step's CPU-expert team one thread a physical core
    (`worker_cpus`); unset or "0": the scheduler places the threads. Session 57 (an H100 box, 16 CPUs, no SMT, one
    NUMA node; offload-cpu-worker-2026-12-07-h100-s57.json): the worker's time an expert spread as widely pinned
    (118-312 us) as not (95-281), and one pinned process's load-time probe read 3 GB/s (the launching thread,
    unpinned, sharing a pinned worker's CPU is the likely cause), so pinning stays off by default."""
    v = os.environ.get(CPU_PIN_ENV, "").strip()
    if v not in ("", "0", "1"):
        raise ValueError(f"{CPU_PIN_ENV}={v!r}: expected 1 (pin the worker's threads) or 0 (the default: do not)")
    return v == "1"


def worker_cpus(n: int, sys_cpu: str = "/sys/devices/system/cpu") -> list[int]:
    """n CPUs of this process's affinity for a worker team, one a physical core before any core's second hardware
    thread: cores in order of (NUMA node, first CPU), each core's lowest CPU. [] where the topology is unreadable
    (not Linux): the caller leaves the threads unpinned."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return []
    cores: dict[tuple[int, int, int], list[int]] = {}
    for c in allowed:
        base = f"{sys_cpu}/cpu{c}"
        try:
            with open(f"{base}/topology/physical_package_id") as f:
                pkg = int(f.read())
            with open(f"{base}/topology/core_id") as f:
                core = int(f.read())
        except (OSError, ValueError):
            return []
        node = next((int(n[len(base) + 5:]) for n in glob.glob(f"{base}/node[0-9]*")), 0)
        cores.setdefault((node, pkg, core), []).append(c)
    groups = [g for _, g in sorted(((k[0], g[0]), g) for k, g in cores.items())]  # by node, then first CPU
    order = [g[0] for g in groups] + [c for g in groups for c in g[1:]]
    return order[:max(0, int(n))]


# Below this host->GPU rate the device step's CPU experts paid most (H200 box, bf16 at --vram-gb 4, replayed routing:
# 1.27x at the native 54 GB/s, 1.68x paced to 25, 2.16-2.55x paced to 12; sessions 12-13): a laptop's link.
SLOW_LINK_GBPS = 30.0


def slow_link_hint(link_gbps: float, cores: int) -> str | None:
    """The line to print when the device slot table runs without CPU experts on a slow link, else None."""
    if not (0 < link_gbps < SLOW_LINK_GBPS) or cores < 2:
        return None
    return (f"hint: the host->GPU link moves {link_gbps:.0f} GB/s; --cpu-experts auto lets {cores - 1} CPU threads "
            "compute misses from the RAM tier beside the copies (measured 2.2-2.6x at 12 GB/s, 1.7x at 25 on an "
            "H200 box; the threads spin while decoding)")


# What a miss sent to the CPU is charged beyond its own time, as a fraction of its copy's time: the CPU's result is not
# admitted to a device slot, so the expert's next use misses again where a copied expert may hit. Without it, a
# lone miss went to the CPU as soon as the CPU computed it a few microseconds sooner than the link copied it, and the
# hit rate fell. Fitted on fit/ (benchmarks/sim_devtable.py, the device step over replayed routing, five documents,
# bf16 at 250 slots, 54 GB/s link, 17 us per layer's CPU hand-off; lru+cpu ratio to the serial Belady bound at
# penalty 0 / 0.25 / 0.5): CPU 45 GB/s 0.716 / 0.716 / 0.717, 60 GB/s 0.738 / 0.757 / 0.757, 75 GB/s 0.794 / 0.786 /
# 0.766, 90 GB/s 0.836 / 0.842 / 0.805; a 12 GB/s link with the CPU at 45 0.946 / 1.051; 25 GB/s 0.835 / 0.839.
ADMIT_PENALTY = 0.25
ADMIT_PENALTY_ENV = "TIERED_ADMIT_PENALTY"


def admit_penalty() -> float:
    """The reuse penalty the device step's split table uses: ADMIT_PENALTY, or TIERED_ADMIT_PENALTY (a benchmark knob:
    0 gives the plain finish-first placement of sessions before 40)."""
    v = os.environ.get(ADMIT_PENALTY_ENV, "").strip()
    if not v:
        return ADMIT_PENALTY
    try:
        out = float(v)
    except ValueError:
        raise ValueError(f"{ADMIT_PENALTY_ENV}={v!r}: give a number >= 0 (copies charged per CPU-computed miss)")
    if out < 0:
        raise ValueError(f"{ADMIT_PENALTY_ENV}={v!r}: give a number >= 0 (copies charged per CPU-computed miss)")
    return out


class CostModel:
    """Per-miss placement from two measured bandwidths (GB/s, 10^9 B/s).

    Args:
        pcie_gbps: host->device copy rate (the paced rate under --h2d-gbps).
        cpu_gbps: CPU expert rate, bytes of expert weights read per second of CPU-expert compute.
        cpu_overhead_s: fixed cost of a layer's CPU work (activations over PCIe, hand-off to the worker).
        fixed: keep the rates (tests, benchmarks); else `note_pcie` / `note_cpu` fold in what runs achieve.
        alpha: weight of a new measurement in the running average.
        reuse_penalty: charged to a CPU placement, in copies of the same bytes (ADMIT_PENALTY: the admission it
            forgoes).
    """

    def __init__(self, pcie_gbps: float, cpu_gbps: float, *, cpu_overhead_s: float = 0.0, fixed: bool = False,
                 alpha: float = 0.2, reuse_penalty: float = ADMIT_PENALTY) -> None:
        if not (pcie_gbps > 0 and cpu_gbps >= 0):
            raise ValueError(f"cost model rates must be positive GB/s, got pcie {pcie_gbps}, cpu {cpu_gbps}")
        if reuse_penalty < 0:
            raise ValueError(f"cost model reuse_penalty must be >= 0, got {reuse_penalty}")
        self.pcie_gbps = float(pcie_gbps)
        self.cpu_gbps = float(cpu_gbps)
        self.cpu_overhead_s = float(cpu_overhead_s)
        self.fixed = fixed
        self.alpha = alpha
        self.reuse_penalty = float(reuse_penalty)

    def place(self, n: int, nbytes: int, *, pcie_queue_s: float = 0.0, cpu_queue_s: float = 0.0) -> list[bool]:
        """n misses of `nbytes` each -> [n] True = compute on the CPU, False = copy to a device slot."""
        out = [False] * n
        if self.cpu_gbps <= 0:
            return out
        tg, tc = pcie_queue_s, cpu_queue_s
        dg = nbytes / (self.pcie_gbps * 1e9)
        dc = nbytes / (self.cpu_gbps * 1e9)
        first = True
        for i in range(n):
            c = tc + dc + (self.cpu_overhead_s if first else 0.0)
            g = tg + dg
            if c + self.reuse_penalty * dg < g:
                out[i] = True
                tc = c
                first = False
            else:
                tg = g
        return out

    def note_pcie(self, nbytes: int, seconds: float) -> None:
        if not self.fixed and seconds > 0 and nbytes > 0:
            self.pcie_gbps += self.alpha * (nbytes / seconds / 1e9 - self.pcie_gbps)

    def note_cpu(self, nbytes: int, seconds: float) -> None:
        if not self.fixed and seconds > 0 and nbytes > 0:
            self.cpu_gbps += self.alpha * (nbytes / seconds / 1e9 - self.cpu_gbps)

    def describe(self) -> str:
        return f"pcie {self.pcie_gbps:.2f} GB/s vs cpu experts {self.cpu_gbps:.2f} GB/s" + (" (fixed)" if self.fixed else "")


class CpuWorker:
    """One thread that runs CPU-expert work with `threads` intra-op threads (set on that thread, so the
    calling thread's own torch thread count is left as it was where the OpenMP runtime keeps it per thread)."""

    def __init__(self, threads: int) -> None:
        self.threads = int(threads)
        self._ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiered-cpu-experts",
                                      initializer=torch.set_num_threads, initargs=(self.threads,))

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._ex.submit(fn, *args)

    def close(self) -> None:
        self._ex.shutdown(wait=True)


class CpuExpertCounts:
    """The `cpu_experts` stats: experts computed on the CPU, their bytes and the worker's compute seconds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.bytes = 0
        self.seconds = 0.0  # worker time computing (GB/s = bytes / seconds)
        self.wait_s = 0.0  # host time blocked on the worker's result
        self.layers = 0  # layer steps with at least one CPU expert

    def add(self, count: int, nbytes: int, seconds: float) -> None:
        with self.lock:
            self.count += count
            self.bytes += nbytes
            self.seconds += seconds
            self.layers += 1

    def stats(self, mode: str, threads: int, dtype: str | None, model: CostModel | None) -> dict:
        out = {"mode": mode, "count": self.count, "bytes": self.bytes,
               "gbps": self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0,
               "seconds": self.seconds, "wait_s": self.wait_s, "threads": threads, "dtype": dtype}
        if model is not None:
            out["model_pcie_gbps"] = model.pcie_gbps
            out["model_cpu_gbps"] = model.cpu_gbps
        return out


def timed(fn: Callable[..., Any]) -> Callable[..., tuple[Any, float]]:
    """fn -> a function returning (fn's result, seconds it took on the calling thread)."""
    def run(*a: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        r = fn(*a)
        return r, time.perf_counter() - t0
    return run

