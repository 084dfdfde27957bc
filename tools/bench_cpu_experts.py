"""CPU-expert rate on this machine: one layer's top-k experts of a given shape computed by model/cpu_experts.py
(the code `--cpu-experts` runs), per dtype and thread count, in GB/s of expert weights read.

    python3 tools/bench_cpu_experts.py [--hidden 2048] [--ffn 768] [--k 8] [--threads 1,2] [--repeats 10]
Defaults are the 10.6B Qwen3-MoE shape of the benchmarks. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tiered.model.cpu_experts import cpu_partial  # noqa: E402
from tiered.store.offload import CpuWorker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=768)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    D, F, K = a.hidden, a.ffn, a.k
    out = []
    for dt in (torch.bfloat16, torch.float32):
        g = torch.randn(K, F, D).to(dt)
        W = SimpleNamespace(gate=g, up=torch.randn(K, F, D).to(dt), down=torch.randn(K, D, F).to(dt), gate_bias=None)
        x = torch.randn(1, D).to(dt)
        w = torch.rand(K)
        jobs = [(k, W, k) for k in range(K)]
        nbytes = 3 * D * F * g.element_size() * K
        for th in [int(t) for t in a.threads.split(",")]:
            wk = CpuWorker(th)

            def run() -> float:
                t0 = time.perf_counter()
                with torch.inference_mode():
                    cpu_partial(x, w, jobs, None)
                return time.perf_counter() - t0

            wk.submit(run).result()
            ts = sorted(wk.submit(run).result() for _ in range(a.repeats))
            wk.close()
            med = ts[len(ts) // 2]
            row = {"dtype": str(dt).removeprefix("torch."), "threads": th, "s_per_layer": med,
                   "gbps": nbytes / med / 1e9}
            out.append(row)
            print(f"{row['dtype']:>9} threads {th}: {med * 1e3:8.2f} ms per {K} experts, {row['gbps']:6.2f} GB/s")
    print(json.dumps({"bench": "cpu_experts", "hidden": D, "ffn": F, "k": K, "runs": out}))


if __name__ == "__main__":
    main()
