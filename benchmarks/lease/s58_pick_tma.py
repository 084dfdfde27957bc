"""The TMA box for session 58's offload runs: the host-descriptor way (tmah_BM) of bench_h2d_read's JSON whose
8-row rate at CTAS programs is highest, printed when it beats the device step's gather there by FACTOR, else
nothing: python3 benchmarks/lease/s58_pick_tma.py h2d_read.json CTAS FACTOR"""
from __future__ import annotations

import json
import sys

fig = json.loads(open(sys.argv[1]).read())["figures"]
ctas, factor = sys.argv[2], float(sys.argv[3])
rows = max(int(k.split("_")[-2].removesuffix("row")) for k in fig)
base = fig.get(f"gather@{ctas}_{rows}row_gbps")
best = max(((v, k.split("@")[0][5:]) for k, v in fig.items()
            if k.startswith("tmah_") and k.endswith(f"@{ctas}_{rows}row_gbps")), default=None)
if base and best and best[0] >= factor * base:
    print(best[1])
