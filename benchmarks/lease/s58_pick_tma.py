"""The demand gather's copy for session 58's offload runs, as a TIERED_GATHER value: of bench_h2d_read's ways that the
engine has (tmah_BM -> tma:BM, l2_256 / nc_256 -> 4:1024:4:<hint>), the one whose 8-row rate at CTAS programs is
highest, printed when it beats the device step's gather there by FACTOR, else nothing:
python3 benchmarks/lease/s58_pick_tma.py h2d_read.json CTAS FACTOR"""
from __future__ import annotations

import json
import sys


def knob(way: str) -> str | None:
    if way.startswith("tmah_"):
        return "tma:" + way[5:]
    return f"4:1024:4:{way}" if way in ("l2_256", "nc_256") else None


fig = json.loads(open(sys.argv[1]).read())["figures"]
ctas, factor = sys.argv[2], float(sys.argv[3])
rows = max(int(k.split("_")[-2].removesuffix("row")) for k in fig)
base = fig.get(f"gather@{ctas}_{rows}row_gbps")
best = max(((v, knob(k.split("@")[0])) for k, v in fig.items()
            if k.endswith(f"@{ctas}_{rows}row_gbps") and knob(k.split("@")[0])), default=None)
if base and best and best[0] >= factor * base:
    print(best[1])
