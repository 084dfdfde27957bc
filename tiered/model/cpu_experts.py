"""CPU experts: the routed experts of a one-token step that the provider sends to the CPU, computed there.

Owns: `cpu_partial` (x [1, D] and the host weights of some of the step's K experts -> their weighted sum
[1, D] in the compute dtype), `start` / `finish` (run it on the provider's worker thread, report the time), and
`prepare` (at load: the CPU dtype, and the CPU-expert GB/s probe that feeds `--cpu-experts auto`'s cost
model).
Does not own: which experts go to the CPU (store/cache.py with store/offload.py's cost model), the worker
thread (store/offload.py), where the partial output is added (moe.expert_mix: after the GPU experts).

The CPU's products run in the model's compute dtype on the stored weights. Measured on the 2-core CI box with
the 10.6B shape (D 2048, F 768, a layer's 8 experts, tools/bench_cpu_experts.py): bf16 weights computed in
bf16, 9.6 GB/s on 1 thread and 16.7 GB/s on 2; converting bf16 weights to fp32 first is ~8x slower (one
expert: 1.5 GB/s); fp32 weights in fp32, 17.7 / 36 GB/s. A weight costs the same time in either dtype there,
so bf16 storage computed in bf16 reads twice the bytes per second, and the GPU runs (bf16) keep bf16 products
on the CPU. Around the products the CPU works in fp32 as the GPU's decode kernels do (kernels/moe_decode.py):
each product's output (accumulated in fp32 inside the GEMV) is rounded once to the compute dtype and then
widened, the activation, the routing weight and the sum over the CPU's experts are fp32, and the partial sum
is rounded once. Only the activation's input to the down product is rounded in between (the product reads
the compute dtype). These are [1, F] and [1, D] vectors: no measurable cost next to the GEMVs. In fp32 this is
the device path's math exactly. Quantized blocks are dequantized (layout.quant.dense, the reference path)
expert by expert.

Legend: D hidden, K top-k, n experts on the CPU.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tiered.layout.quant import dense
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
                fp32_weights: bool = False) -> Tensor:
    """x [1, D] host (compute dtype), w_route [K] host fp32 routing weights of the step, jobs [(k, W, row)]
    -> [1, D] compute dtype: sum over the jobs of w_route[k] * expert(W, row)(x), summed in fp32. The routing
    weights are rounded to the compute dtype first unless `fp32_weights`, as the device path rounds them."""
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
    """Submit a layer's CPU experts to the provider's worker; x [1, D] and w_route [K] on the host."""
    return provider.cpu_worker.submit(_timed_partial, x, w_route, jobs, act, fp32_weights)


def finish(provider: Any, fut: Future, n: int) -> Tensor:
    """Wait for `start`'s result ([1, D] host, compute dtype); counts the work in the provider's stats."""
    t0 = time.perf_counter()
    y, secs = fut.result()
    provider.cpu.wait_s += time.perf_counter() - t0
    provider.note_cpu_experts(n, secs)
    return y


def prepare(provider: Any, dtype: torch.dtype, act: ClampedSwiGLU | None = None, *, repeats: int = 3) -> None:
    """At load, for a provider that may send experts to the CPU (`split`): record the CPU dtype and, when it has
    a cost model still without a CPU rate (auto on CUDA), measure one expert's CPU time on the worker (the
    best of `repeats`, after one warm-up) and set the model's CPU GB/s from it, and its per-layer overhead."""
    if not getattr(provider, "split", False):
        return
    provider.cpu_dtype = str(dtype).removeprefix("torch.")
    cm = provider.cost_model
    if cm is None or cm.cpu_gbps > 0:
        return
    jobs: list = []
    provider._host_blocks_probe(jobs)
    D = provider.layout.config.hidden_size
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(0)).to(dtype)
    w = torch.ones(1)
    best = float("inf")
    for i in range(repeats + 1):
        _, secs = provider.cpu_worker.submit(_timed_partial, x, w, jobs, act, False).result()
        if i:
            best = min(best, secs)
    cm.cpu_gbps = provider.block_size / best / 1e9
    # the fixed cost of a layer's CPU work: the hand-off to the worker and back (best of a few empty round
    # trips), plus x [1, D] to the host and the partial sum back (two small copies, ~10 us each over PCIe)
    hop = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        provider.cpu_worker.submit(int).result()
        hop = min(hop, time.perf_counter() - t0)
    cm.cpu_overhead_s = hop + (2e-5 if provider.device.type == "cuda" else 0.0)
