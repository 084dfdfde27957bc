#!/usr/bin/env bash
# Session 20, call C (cold box), q4+q4 at --vram-gb 4, replayed routing. Calls A and B found: the default row fills in
# expert-id order (its layout has no fitted router history, so no popularity order: 88 misses while filling against
# 25 for a fixed 6 in popularity order); the fill's copy shape is best as it is (4 warps, 1,024-word loads, 32
# programs); the warm step spends 24 us a token in resolve and 21 us in the demand gathers (all hits: 528 programs
# that find nothing to copy).
#   1. N swept with the timeline (popularity order from the first step): 4, 5, 6, 7; the default on a tuned layout
#      (default/tuned) and untuned (default);
#   2. the demand gather's programs (TIERED_GATHER_CTAS): 132, 64, 32 against the default 528, fill off and fixed 6;
#   3. the headline rows without the timeline, 127 tokens and 511.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
S="lru+fill4/device,lru+fill5/device,lru+fill6/device,lru+fill7/device,default/tuned,default"
TIMEOUT=150 LAYOUT=layout-q4 offload_variant sweep "$S" --device-fill 4,5,6,7 --timeline "$S" > /dev/null
echo "sweep $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-sweep.json; pack
for c in 132 64 32; do
  TIERED_GATHER_CTAS=$c TIMEOUT=80 LAYOUT=layout-q4 offload_variant "ctas$c" "lru/device,lru+fill6/device" \
    --device-fill 6 > /dev/null
  echo "demand ctas $c $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-ctas$c.json
done
TIMEOUT=120 LAYOUT=layout-q4 offload_variant head "default,default/tuned,lru/device,lru+fill6/device,lru+fill8/device" \
  --device-fill 6,8 > /dev/null
echo "head $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-head.json
TIMEOUT=120 LAYOUT=layout-q4 offload_variant long "default,default/tuned,lru/device,lru+fill6/device" --device-fill 6 \
  --new-tokens 512 > /dev/null
echo "long $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-long.json
pack
