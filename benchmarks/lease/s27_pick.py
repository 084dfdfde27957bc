"""Session 27: the two fastest few-row tiles of call A's sweep (10.6B, q4, T = 128, i.e. 8 rows an expert) as
TIERED_QGROUPED_FEW specs, one a line, the fastest first; call B times the batch decode under each.

    python3 benchmarks/lease/s27_pick.py /root/res_s27_callA/quant_prefill.json
"""
import json
import re
import sys

rows = json.load(open(sys.argv[1]))["rows"]
cand = [r for r in rows if r.get("shape") == "10.6B" and r.get("T") == 128 and r.get("fmt") == "q4"
        and r.get("variant") == "triton grouped" and "us" in r and "swap" in r.get("config", "")]
cand.sort(key=lambda r: r["us"])
for r in cand[:2]:
    m = re.match(r"m(\d+) n(\d+) k(\d+) w(\d+) s(\d+) swap(\d+)", r["config"])
    print("m{}:n{}:k{}:w{}:s{}:swap{}".format(*m.groups()))
