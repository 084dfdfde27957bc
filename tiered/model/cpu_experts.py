"""CPU experts: the routed experts of a one-token step that the provider sends to the CPU, computed there.

Owns: `cpu_partial` (x [1, D] and the host weights of some of the step's K experts -> their weighted sum
[1, D] in the compute dtype), `start` / `finish` (run it on the provider's worker thread, report the time), and
`prepare` (at load: the CPU dtype, and the CPU-expert GB/s probe that feeds `--cpu-experts auto`'s cost
model).
Does not own: which experts go to the CPU (store/cache.py with store/offload.py's cost model), the worker
thread (store/offload.py), where the partial output is added (moe.expert_mix: after the GPU experts).

Two implementations of one math: the native kernel (kernels/cpu_kernel.c through cpu_kernel.py, compiled on
first use; threads over output rows, AVX-512/AVX2 where present, reading bf16/fp32/fp16/q8/q4 blocks in place)
and the torch reference below (`cpu_partial` without a kernel: quantized blocks are dequantized expert by
expert with layout.quant.dense, F.linear in the compute dtype). `start` uses the kernel the provider holds
(`prepare` loads it; with no compiler it warns once and the provider keeps None) for whatever it supports, torch
otherwise (fp8, mxfp4, gpt-oss's clamped activation and biases).
Math, both paths: the products read the compute dtype's x and the stored weights (the native kernel widens the
stored weights to fp32 exactly; torch's F.linear rounds fp32 or quantized weights to a bf16 compute dtype
first, which the native path does not: it is closer to the fp32 result), accumulate in fp32, and each product's
output is rounded once to the compute dtype; the activation, the routing weight and the sum over the CPU's
experts (in job order) are fp32 and the partial sum is rounded once, as the GPU's decode kernels do
(kernels/moe_decode.py); the activation's output is rounded to the compute dtype before the down product. In
fp32 this is the device path's math exactly up to the summation order; bf16 weights computed in bf16 agree with
torch bit for bit in the tests.
Rates (tools/bench_cpu_experts.py: GB/s of expert blocks read, a 1 GB pool so that weights come from DRAM, bf16
compute) on the 2-core CI box (Xeon, AVX-512 + AVX512-BF16, 2.1 GHz; shared with other jobs, so 2 threads rarely
got the second core), 1 thread, median: 10.6B shape (D 2048, F 768, 8 experts) torch bf16 7.3-8.1, native bf16
10.1-10.9, q8 7.3-7.6, q4 5.2-6.3; 397B shape (D 4096, F 1024, 10 experts) torch bf16 9.0, native bf16 13.0, q8
7.6, q4 3.4-4.3 (best 5.8). A plain 1-thread AVX-512 read of 1 GB runs 7.6-15 GB/s there: native bf16 is at the
core's DRAM rate; q8 and q4 are compute-bound per core (about 2x and 3x bf16's weights per byte). The load-time
probe (`prepare`) measures the path a run will use.

Legend: D hidden, K top-k, n experts on the CPU.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.layout.quant import dense
from tiered.kernels.cpu_kernel import CpuKernel, act_mode
from tiered.model.moe import ClampedSwiGLU, _act


def _expert_fp32(x: Tensor, W: Any, s: int, act: ClampedSwiGLU | None) -> Tensor:
    """One expert (row s of W) over x [1, D] (compute dtype) -> [1, D] fp32: the products in the compute dtype,
    biases included when the family has them, the activation in fp32."""
    dt = x.dtype
    g, u, d = dense(W.gate[s], dt), dense(W.up[s], dt), dense(W.down[s], dt)  # quantized: dequantized here
    if getattr(W, "gate_bias", None) is None:
        gb = ub = db = None
    else:
        gb, ub, db = W.gate_bias[s].to(dt), W.up_bias[s].to(dt), W.down_bias[s].to(dt)
    h = _act(act, F.linear(x, g, gb).float(), F.linear(x, u, ub).float())  # [1, F] fp32
    return F.linear(h.to(dt), d, db).float()


def cpu_partial(x: Tensor, w_route: Tensor, jobs: list[tuple[int, Any, int]], act: ClampedSwiGLU | None,
                fp32_weights: bool = False, kernel: CpuKernel | None = None, threads: int = 0) -> Tensor:
    """x [1, D] host (compute dtype), w_route [K] host fp32 routing weights of the step, jobs [(k, W, row)]
    -> [1, D] compute dtype: sum over the jobs of w_route[k] * expert(W, row)(x), summed in fp32. The routing
    weights are rounded to the compute dtype first unless `fp32_weights`, as the device path rounds them.
    With `kernel`, the native kernel computes it on `threads` threads (0 = OpenMP's default) when it supports
    the jobs' format, activation and dtype; else (or without a kernel) the torch reference below."""
    if kernel is not None and jobs:
        y = kernel.partial(x, w_route, jobs, threads=threads, fp32_weights=fp32_weights, act=act)
        if y is not None:
            return y
    dt = x.dtype
    ys = torch.stack([_expert_fp32(x, W, row, act) for _, W, row in jobs])  # [n, 1, D] fp32
    wk = w_route[[k for k, _, _ in jobs]]  # [n] fp32
    if not fp32_weights:
        wk = wk.to(dt)
    return (ys * wk.float().view(-1, 1, 1)).sum(0).to(dt)  # [1, D]


def _timed_partial(*a: Any) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = cpu_partial(*a)
    return y, time.perf_counter() - t0


def start(provider: Any, x: Tensor, w_route: Tensor, jobs: list, act: ClampedSwiGLU | None,
          fp32_weights: bool = False) -> Future:
    """Submit a layer's CPU experts to the provider's worker; x [1, D] and w_route [K] on the host. The native
    kernel runs when `prepare` loaded one (provider.cpu_kernel), on the worker's --cpu-threads."""
    wk = provider.cpu_worker
    return wk.submit(_timed_partial, x, w_route, jobs, act, fp32_weights, getattr(provider, "cpu_kernel", None),
                     wk.threads)


def finish(provider: Any, fut: Future, n: int) -> Tensor:
    """Wait for `start`'s result ([1, D] host, compute dtype); counts the work in the provider's stats."""
    t0 = time.perf_counter()
    y, secs = fut.result()
    provider.cpu.wait_s += time.perf_counter() - t0
    provider.note_cpu_experts(n, secs)
    return y


def prepare(provider: Any, dtype: torch.dtype, act: ClampedSwiGLU | None = None, *, repeats: int = 3,
            native: bool | None = None) -> None:
    """At load, for a provider that may send experts to the CPU (`split`): record the CPU dtype, load the native
    kernel (provider.cpu_kernel; None and a one-line warning without a compiler; `native=False`, or the
    environment's TIERED_CPU_KERNEL=torch, keeps torch), and, when the provider has a cost model still without a
    CPU rate (auto on CUDA), measure a layer's worth of CPU experts on the worker with the path a run will take
    (top-k experts of each of the first 4 layers, read from the file mapping: each set warmed once, then the
    median of `repeats` rounds over the sets) and set the model's CPU GB/s from it, and its per-layer
    overhead."""
    if not getattr(provider, "split", False):
        return
    provider.cpu_dtype = str(dtype).removeprefix("torch.")
    if native is None:
        native = os.environ.get("TIERED_CPU_KERNEL", "native") != "torch"
    kern = CpuKernel.load(act=act_mode()) if native else None
    provider.cpu_kernel = kern
    provider.cpu_kernel_name = "torch"
    if kern is not None:
        probe: list = []
        provider._host_blocks_probe(probe)
        if kern.supports(probe[0][1], act, dtype):
            provider.cpu_kernel_name = f"native-{kern.simd_name}"
    cm = provider.cost_model
    if cm is None or cm.cpu_gbps > 0:
        return
    cfg = provider.layout.config
    K, E = min(cfg.top_k, cfg.num_experts), cfg.num_experts
    sets = []  # K experts of each of a few layers: together larger than a last-level cache, as in a run
    for l in range(min(4, cfg.num_layers)):
        jobs: list = []
        provider._host_blocks_probe(jobs, [l * E + e for e in range(K)])
        sets.append([(i, W, row) for i, (_, W, row) in enumerate(jobs)])
    x = torch.randn(1, cfg.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = torch.ones(K)
    kern, wk = provider.cpu_kernel, provider.cpu_worker
    for jobs in sets:  # warm-up: page faults, and the first reads from disk when the page cache is cold
        wk.submit(_timed_partial, x, w, jobs, act, False, kern, wk.threads).result()
    times = sorted(wk.submit(_timed_partial, x, w, jobs, act, False, kern, wk.threads).result()[1]
                   for _ in range(repeats) for jobs in sets)
    best = times[len(times) // 2] / K  # the median call, per expert
    cm.cpu_gbps = provider.block_size / best / 1e9
    # the fixed cost of a layer's CPU work: a one-expert job's round trip beyond one expert's share of the rate
    # (the hand-off to the worker and back, the kernel's setup and its thread team for a call too small to use
    # it well; best of a few), plus the partial sum back to the device (a small copy, ~10 us over PCIe; x crosses
    # with the routing)
    one = sets[0][:1]
    hop = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        wk.submit(_timed_partial, x, w, one, act, False, kern, wk.threads).result()
        hop = min(hop, time.perf_counter() - t0 - best)
    cm.cpu_overhead_s = max(hop, 0.0) + (1e-5 if provider.device.type == "cuda" else 0.0)
