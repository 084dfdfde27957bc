"""The CPU-expert mailbox's rate on its own (model/cpu_mailbox.py): GB/s of expert blocks the native worker reads
per second of compute, and the host-side round trip, by thread count and experts per post; alone and while the
GPU's gather kernel pulls other blocks out of the same pinned RAM tier (the device step runs both at once).

    python3 benchmarks/bench_mailbox.py --layout /root/peers/layout --threads 8,16 --experts 1,2,4

Prints one JSON object per line, a summary last; writes $OUT/mailbox.json when OUT is set. Blocks are picked at
random over every expert (1,024 blocks of 9.4 MB at the 10.6B shape: DRAM, not cache). On a CPU-only machine it
runs the worker without the contention runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tiered.engine import load  # noqa: E402
from tiered.model.cpu_mailbox import CpuMailbox  # noqa: E402


def measure(box: CpuMailbox, n: int, repeats: int, rng: random.Random, rows_all: list[int], B: int) -> dict:
    K, D = box.K, box.D
    x = torch.randn(1, D).to(box.dtype)
    w = torch.rand(K)
    out = torch.empty(1, D, dtype=box.dtype)
    walls, comps = [], []
    for i in range(repeats + 2):
        rows = torch.full((K,), -1, dtype=torch.int64)
        rows[:n] = torch.tensor(rng.sample(rows_all, n))
        ns0 = int(box.stat[2])
        t0 = time.perf_counter()
        box.wait(out, box.post(x, rows, w))
        wall = time.perf_counter() - t0
        if i >= 2:
            walls.append(wall)
            comps.append((int(box.stat[2]) - ns0) * 1e-9)
        time.sleep(0.0005)  # a decode step's gap between posts (the worker keeps spinning)
    walls.sort()
    comps.sort()
    med_c, med_w = comps[len(comps) // 2], walls[len(walls) // 2]
    return {"experts": n, "compute_us": med_c * 1e6, "wall_us": med_w * 1e6, "gbps": n * B / med_c / 1e9,
            "gbps_wall": n * B / med_w / 1e9, "overhead_us": (med_w - med_c) * 1e6}


def anon_huge_gib() -> float | None:
    """GiB of this process's memory in transparent huge pages (the RAM tier asks for them: store/hostmem.py)."""
    try:
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", type=Path, required=True)
    ap.add_argument("--threads", default="8,16")
    ap.add_argument("--experts", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--vram-gb", type=float, default=4.0)
    ap.add_argument("--ram-gb", type=float, default=10.5, help="the pinned RAM tier: every expert (10.6B bf16: 9.7 GB)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    eng = load(a.layout, device=dev, dtype=torch.bfloat16,
               budget={"vram_gb": a.vram_gb, "ram_gb": a.ram_gb, "io": "mmap", "ram_preload": True,
                       "cpu_experts": "auto", "slot_table": "device" if cuda else "host"})
    cache = eng.model.provider
    cfg = eng.config
    B = cache.block_size
    N = cache.num_layers * cache.num_experts
    cache.ram.preload(list(range(N)), 0)
    rows_all = [cache.ram.table.lookup(k) for k in range(N)]
    kern = cache.cpu_kernel
    res = {"bench": "mailbox", "commit": os.environ.get("TIERED_COMMIT"), "date": time.strftime("%Y-%m-%d"),
           "device": torch.cuda.get_device_name() if cuda else "cpu", "block_bytes": B, "cpu_count": os.cpu_count(),
           "kernel": getattr(cache, "cpu_kernel_name", None),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "anon_huge_gib": anon_huge_gib(), "runs": []}
    if cache.cpu_box is not None:
        cache.cpu_box.close()
        cache.cpu_box = None
    rng = random.Random(0)
    for T in [int(t) for t in a.threads.split(",")]:
        box = CpuMailbox(kern, cache.ram_views(), K=cfg.top_k, D=cfg.hidden_size, dtype=torch.bfloat16, threads=T,
                         pin=cuda).start()
        for contend in ([False, True] if cuda else [False]):
            if contend:  # the GPU's gather pulls 8 other blocks a launch out of the same RAM tier, back to back
                table = cache.devtable
                src = torch.tensor(rng.sample(rows_all, 8), dtype=torch.int64, device=dev)
                dst = torch.arange(8, dtype=torch.int64, device=dev)
                side = torch.cuda.Stream(dev)
                with torch.cuda.stream(side):
                    for _ in range(400):
                        table.gather(src, dst)
                t_g0 = time.perf_counter()
            for n in [int(e) for e in a.experts.split(",")]:
                r = {"threads": T, "contend": contend, **measure(box, n, a.repeats, rng, rows_all, B)}
                res["runs"].append(r)
                print(json.dumps(r), flush=True)
            if contend:
                side.synchronize()
                g_s = time.perf_counter() - t_g0
                res.setdefault("gather_gbps_during", []).append(400 * 8 * B / g_s / 1e9)
        box.close()
    best = max((r for r in res["runs"] if not r["contend"]), key=lambda r: r["gbps"])
    res["best_alone"] = best
    print(json.dumps(res))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "mailbox.json").write_text(json.dumps(res, indent=1))
    cache.close()


if __name__ == "__main__":
    main()
