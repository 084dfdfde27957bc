"""One line per run of a bench_cpu_experts_gpu.py JSON (its last line), for the lease scripts' logs: tok/s, hit rate,
the PCIe and serial Belady bounds' ratios, the fill auto's pace (N, retunes, share), the copy fill's blocks, seconds
and complete steps and, with --timeline, the timeline's summary.

    python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-head.json
"""
from __future__ import annotations

import json
import sys

TL = ("first_fill_step", "last_fill_step", "mean_us_filling", "mean_us_rest", "misses_filling", "mean_us")


def main(path: str) -> None:
    d = json.loads(open(path).read().strip().splitlines()[-1])
    for k, r in d["docs"][0]["runs"].items():
        t = r.get("timeline") or {}
        f = (r.get("device_fill") or {}).get("auto") or {}
        c = (r.get("device_fill") or {}).get("copy") or {}
        print(" ", k, round(r["decode_tok_s"], 1), round(r["hit_rate"], 4), round(r.get("vs_pcie_bound") or 0, 4),
              round(r.get("vs_serial_belady_bound") or 0, 4),
              {x: f.get(x) for x in ("n", "retunes", "share")} if f else "",
              {x: c.get(x) for x in ("planned", "left", "landed", "batch", "depth", "fill_s")} if c else "",
              {x: (r.get("device_fill") or {}).get(x) for x in ("complete_steps", "planned_steps")} if c else "",
              {x: round(t[x], 1) if isinstance(t[x], float) else t[x] for x in TL if x in t} if t else "",
              {x: (round(v, 2) if isinstance(v, float) else v) for x, v in (r.get("cpu_experts") or {}).items()
               if x in ("count", "gbps", "model_cpu_gbps", "model_pcie_gbps")},
              "take", (r.get("device_cpu") or {}).get("take"))


if __name__ == "__main__":
    main(sys.argv[1])
