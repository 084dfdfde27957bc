#!/usr/bin/env bash
# Session 21, call B: call A's comparison (the top-k inside resolve, or its own launch) again, interleaved: off, on,
# off, on (run from a /tmp copy, so its tarball is b.tgz).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4
RUNS="default,default/tuned,lru/device,lru+fill7/device"
for t in off2:0 on2:1 off3:0 on3:1; do
TIERED_TOPK_RESOLVE=${t#*:} TIMEOUT=150 LAYOUT=layout-q4 offload_variant ${t%:*} "$RUNS" --device-fill 7 > /dev/null
echo "${t%:*} $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-${t%:*}.json; pack
done
