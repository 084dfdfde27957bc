"""CPU-expert rate on this machine: one layer's K experts of a given shape computed by model/cpu_experts.py (the
code `--cpu-experts` runs), per path, format and thread count, in GB/s of expert blocks read (the bytes the cost
model counts: block_size per expert).

    python3 tools/bench_cpu_experts.py [--hidden 2048] [--ffn 768] [--k 8] [--threads 1,2] [--repeats 10]
        [--paths torch-bf16,bf16,q8,q4] [--pool-gb 1.0] [--links 55,25,12]

Paths: "torch-FMT" is the torch reference (cpu_partial: dequantize, F.linear), "FMT" the native kernel
(kernels/cpu_kernel.c); FMT in fp32, bf16, q8, q4; "q4@q8" the native kernel in the q8 activation mode
(TIERED_CPU_ACT=q8: q4 products from 8-bit inputs, integer dot products; the probe runs in that mode too). The
compute dtype is bf16 (fp32 for fp32 weights), as on GPU runs. The experts sit in a pool of blocks laid out as in
experts.bin (layout/format.plan_block, views from store/disk.expert_views) of --pool-gb GB; each call takes the next
K experts of the pool, so once the pool is larger than the last-level cache the weights come from DRAM, as they do
in a run. Random codes and scales: the
rate does not depend on the values. Prints a table, then one JSON line (also $OUT/bench_cpu_experts.json).

Defaults are the 10.6B Qwen3-MoE shape of the benchmarks; the 397B shape is --hidden 4096 --ffn 1024 --k 10.
On the GPU box (16 cores; about a minute for both shapes, the kernel compiles in ~1 s on first use):
    python3 tools/bench_cpu_experts.py --threads 16,8 --pool-gb 4 && \
    python3 tools/bench_cpu_experts.py --hidden 4096 --ffn 1024 --k 10 --threads 16,8 --pool-gb 4

Builds against each other (--variant NAME=DEFINES, repeated; e.g. --variant pfd0=PFD=0 --variant pfd8=): each native
path under each build of kernels/cpu_kernel.c with those -D defines, the builds' calls alternating in --rounds rounds
of --repeats, medians per build (no probe; $OUT/bench_cpu_experts_builds_DxFxK.json).

Then, per format and thread count, the load-time probe itself (model/cpu_experts.prepare, the code `--cpu-experts
auto` runs at load, on a stand-in provider over the same pool) and what the cost model (store/offload.CostModel)
decides with that CPU rate for a layer with 1, 2, 4 or K misses on links of --links GB/s (host->GPU; the per-layer
overhead includes the two small PCIe copies of a CUDA run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tiered.layout.format import plan_block  # noqa: E402
from tiered.layout.quant import QuantWeight  # noqa: E402
from tiered.model.cpu_experts import cpu_partial, prepare  # noqa: E402
from tiered.kernels.cpu_kernel import ACT_ENV, CpuKernel  # noqa: E402
from tiered.store.disk import expert_views  # noqa: E402
from tiered.store.offload import CostModel, CpuWorker, cpu_threads  # noqa: E402

STORED = {"fp32": "float32", "bf16": "bfloat16", "q8": "q8", "q4": "q4"}


def make_pool(fmt: str, D: int, F: int, n: int, seed: int = 0):
    """n experts of one format in the block layout: (ExpertWeights views, block_size). Codes uniform, scales
    small (q4 mins negative), so the products stay finite."""
    dt = STORED[fmt]
    specs, bs = plan_block({"gate": ((F, D), dt), "up": ((F, D), dt), "down": ((D, F), dt)})
    pool = torch.zeros(n, bs, dtype=torch.uint8)
    W = expert_views(pool, specs)
    g = torch.Generator().manual_seed(seed)
    for i in range(0, n, 16):  # 16 experts at a time: no full-size temporaries
        for m in (W.gate, W.up, W.down):
            if isinstance(m, QuantWeight):
                q = m.q[i:i + 16]
                lo, hi = (-127, 128) if fmt == "q8" else (0, 256)
                q.copy_(torch.randint(lo, hi, q.shape, generator=g, dtype=q.dtype))
                m.scale[i:i + 16].copy_(torch.rand(m.scale[i:i + 16].shape, generator=g) * 1e-3)
                if m.min is not None:
                    m.min[i:i + 16].copy_(-8e-3 * torch.rand(m.min[i:i + 16].shape, generator=g))
            else:
                m[i:i + 16].copy_(torch.randn(m[i:i + 16].shape, generator=g) * 0.02)
    return W, bs


def pool_for(fmt: str, D: int, F: int, K: int, pool_gb: float):
    """(ExpertWeights views, block_size, n): a pool of n >= K experts of one format, about pool_gb GB."""
    bs = plan_block({"gate": ((F, D), STORED[fmt]), "up": ((F, D), STORED[fmt]), "down": ((D, F), STORED[fmt])})[1]
    n = max(K, int(pool_gb * 1e9 // bs))
    return make_pool(fmt, D, F, n)[0], bs, n


def token_inputs(fmt: str, D: int, K: int) -> tuple[torch.dtype, torch.Tensor, torch.Tensor]:
    """(compute dtype, x [1, D], routing weights [K]): bf16 compute as on GPU runs, fp32 for fp32 weights."""
    cdt = torch.float32 if fmt == "fp32" else torch.bfloat16
    return cdt, torch.randn(1, D, generator=torch.Generator().manual_seed(1)).to(cdt), torch.rand(K)


class PoolCycle:
    """The next K experts of a pool of n at each call (wrapping), so the weights come from DRAM once the pool is
    larger than the last-level cache."""

    def __init__(self, W, n: int, K: int) -> None:
        self.W, self.n, self.K, self.i = W, n, K, 0

    def jobs(self) -> list:
        i = self.i
        self.i = (i + self.K) % (self.n - self.K + 1) if self.n > self.K else 0
        return [(k, self.W, i + k) for k in range(self.K)]


def measure(fn, repeats: int) -> tuple[float, float]:
    """(median, best) seconds of fn() (fn returns its own time), after one warm-up call."""
    fn()
    ts = sorted(fn() for _ in range(repeats))
    return ts[len(ts) // 2], ts[0]


class ProbeProvider:
    """What cpu_experts.prepare reads from a provider (store/cache.ExpertCache), over a bench pool: expert key
    layer * K + e is pool row key % n; the device is CUDA for the overhead term (two small PCIe copies)."""

    def __init__(self, W, bs: int, n: int, D: int, K: int, threads: int, native: bool) -> None:
        self.W, self.n = W, n
        self.split, self.block_size = True, bs
        self.device = SimpleNamespace(type="cuda")
        self.layout = SimpleNamespace(config=SimpleNamespace(top_k=K, num_experts=K, num_layers=4, hidden_size=D))
        self.cpu_worker = CpuWorker(threads)
        self.cost_model = CostModel(55.0, 0.0)
        self.native = native

    def _host_blocks_probe(self, out: list, keys=(0,)) -> None:
        out.extend((0, self.W, k % self.n) for k in keys)


def probe(W, bs: int, n: int, D: int, K: int, th: int, native: bool, dtype: torch.dtype, links: list[float]) -> dict:
    p = ProbeProvider(W, bs, n, D, K, th, native)
    prepare(p, dtype, native=native)
    p.cpu_worker.close()
    cm = p.cost_model
    places = {}
    for link in links:
        m = CostModel(link, cm.cpu_gbps, cpu_overhead_s=cm.cpu_overhead_s, fixed=True)
        places[str(link)] = {str(m_): sum(m.place(m_, bs)) for m_ in sorted({1, 2, 4, K})}
    return {"cpu_gbps": cm.cpu_gbps, "cpu_overhead_s": cm.cpu_overhead_s, "kernel": p.cpu_kernel_name,
            "to_cpu_of_misses": places}


def compare_builds(a, variants: list[tuple[str, str]]) -> None:
    """--variant: each native path under each build, the builds' calls alternating (rounds of --repeats calls)."""
    from tiered.kernels.cpu_kernel import build
    D, F, K = a.hidden, a.ffn, a.k
    kerns = {}
    for name, defs in variants:
        path = build(defines=tuple(d for d in defs.split(",") if d))
        for act in ("float", "q8"):
            kerns[name, act] = CpuKernel(path, act)
    out = []
    for path in a.paths.split(","):
        fmt, _, act = path.partition("@")
        if fmt not in STORED or path.startswith("torch-"):
            raise SystemExit(f"{path}: --variant compares native paths (fp32, bf16, q8, q4, q4@q8)")
        W, bs, n = pool_for(fmt, D, F, K, a.pool_gb)
        _, x, w = token_inputs(fmt, D, K)
        for th in [cpu_threads(int(t)) for t in a.threads.split(",")]:
            wk = CpuWorker(th)
            cyc = PoolCycle(W, n, K)
            times: dict[str, list[float]] = {name: [] for name, _ in variants}

            def call(kern) -> float:
                jobs = cyc.jobs()
                t0 = time.perf_counter()
                kern.partial(x, w, jobs, threads=th)
                return time.perf_counter() - t0

            for _ in range(a.rounds):
                for name, _ in variants:
                    kern = kerns[name, act or "float"]
                    wk.submit(call, kern).result()  # warm-up
                    times[name] += [wk.submit(call, kern).result() for _ in range(a.repeats)]
            wk.close()
            for name, defs in variants:
                ts = sorted(times[name])
                med = ts[len(ts) // 2]
                row = {"path": path, "variant": name, "defines": defs, "threads": th, "s_per_layer": med,
                       "gbps": K * bs / med / 1e9, "gbps_best": K * bs / ts[0] / 1e9, "calls": len(ts)}
                out.append(row)
                print(f"{path:>8} {name:>10} threads {th:2d}: {med * 1e3:8.3f} ms per {K} experts, "
                      f"{row['gbps']:7.2f} GB/s (best {row['gbps_best']:6.2f})")
    res = {"bench": "cpu_experts_builds", "hidden": D, "ffn": F, "k": K, "pool_gb": a.pool_gb,
           "cpu_count": os.cpu_count(), "physical_cores": cpu_threads(0), "runs": out}
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / f"bench_cpu_experts_builds_{D}x{F}x{K}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", default="1,2", help="comma list; 0 = the physical cores (--cpu-threads 0)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--paths", default="torch-bf16,bf16,q8,q4")
    ap.add_argument("--pool-gb", type=float, default=1.0, help="expert pool per format, GB (10^9 B)")
    ap.add_argument("--links", default="55,25,12", help="host->GPU GB/s for the cost model's decisions ('' = skip)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DEFINES",
                    help="a native build with these comma-separated -D defines (e.g. pfd16=PFD=16; 'base=' for none); "
                         "repeat to compare builds: their calls alternate in rounds of --repeats (--rounds), so "
                         "drift on a shared machine hits every build alike. Native paths only; no probe")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the alternation with --variant")
    a = ap.parse_args()
    D, F, K = a.hidden, a.ffn, a.k
    links = [float(x) for x in a.links.split(",") if x]
    variants = [v.partition("=")[::2] for v in a.variant]
    if variants:
        return compare_builds(a, variants)
    kerns = {"float": CpuKernel.load(), "q8": CpuKernel.load(act="q8", warn=False)}
    out = []
    pools: dict[str, tuple] = {}
    for path in a.paths.split(","):
        torch_path = path.startswith("torch-")
        fmt, _, act = path.removeprefix("torch-").partition("@")
        act = act or "float"
        if act != "float" and (torch_path or fmt != "q4"):
            raise SystemExit(f"{path}: the activation mode @{act} applies to the native q4 path only (q4@q8)")
        kern = kerns[act]
        if not torch_path and kern is None:
            print(f"{path}: skipped, no native kernel")
            continue
        if fmt not in pools:
            pools.clear()  # one format's pool at a time (give paths of one format one after the other)
            t0 = time.perf_counter()
            pools[fmt] = pool_for(fmt, D, F, K, a.pool_gb)
            _, bs, n = pools[fmt]
            print(f"{fmt}: pool of {n} experts of {bs / 1e6:.2f} MB ({n * bs / 1e9:.2f} GB), "
                  f"built in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        W, bs, n = pools[fmt]
        cdt, x, w = token_inputs(fmt, D, K)
        for th in [cpu_threads(int(t)) for t in a.threads.split(",")]:
            wk = CpuWorker(th)
            cyc = PoolCycle(W, n, K)

            def call() -> float:
                jobs = cyc.jobs()
                t0 = time.perf_counter()
                if torch_path:
                    with torch.inference_mode():
                        cpu_partial(x, w, jobs, None)
                else:
                    kern.partial(x, w, jobs, threads=th)
                return time.perf_counter() - t0

            med, best = measure(lambda: wk.submit(call).result(), a.repeats)
            wk.close()
            row = {"path": path, "format": fmt, "compute": str(cdt).removeprefix("torch."), "threads": th,
                   "s_per_layer": med, "gbps": K * bs / med / 1e9, "gbps_best": K * bs / best / 1e9,
                   "block_bytes": bs, "simd": None if torch_path else kern.simd_name}
            line = (f"{path:>11} threads {th:2d}: {med * 1e3:8.3f} ms per {K} experts, {row['gbps']:7.2f} GB/s "
                    f"(best {row['gbps_best']:6.2f})")
            if links:
                with mock.patch.dict(os.environ, {ACT_ENV: act}):  # the probe loads its kernel in the path's mode
                    row["probe"] = probe(W, bs, n, D, K, th, not torch_path, cdt, links)
                pr = row["probe"]
                line += (f"; probe {pr['cpu_gbps']:6.2f} GB/s + {pr['cpu_overhead_s'] * 1e6:.0f} us/layer, to CPU of "
                         + ", ".join(f"{K} misses at {lk} GB/s: {pr['to_cpu_of_misses'][str(lk)][str(K)]}"
                                     for lk in links))
            out.append(row)
            print(line)
    res = {"bench": "cpu_experts", "hidden": D, "ffn": F, "k": K, "pool_gb": a.pool_gb,
           "cpu_count": os.cpu_count(), "physical_cores": cpu_threads(0), "runs": out}
    if os.environ.get("OUT"):
        p = Path(os.environ["OUT"]) / f"bench_cpu_experts_{D}x{F}x{K}.json"
        p.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
