#!/usr/bin/env bash
# Session 20, call D (cold box), at the final commit: FILL_SHARE 0.9 (auto's N 7 at a 420 us step where 0.75 gave 5).
# q4+q4 at --vram-gb 4, replayed routing: the default (an untuned layout: the fill in expert-id order), the default on
# a tuned layout (popularity order), the fill off, fixed 6, 7 and 8; 127 tokens, then 511. The bf16 default at the same
# budget (issue 13's q4/bf16 offload ratio). Then the CUDA tests of the gather's shapes and the fill.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant head \
  "default,default/tuned,lru/device,lru+fill6/device,lru+fill7/device,lru+fill8/device" --device-fill 6,7,8 > /dev/null
echo "head $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-head.json; pack
TIMEOUT=120 LAYOUT=layout-q4 offload_variant long "default,default/tuned,lru/device,lru+fill7/device" \
  --device-fill 7 --new-tokens 512 > /dev/null
echo "long $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-long.json; pack
peers_layout layout source source; pack
TIMEOUT=120 offload_variant head "default,default/tuned,lru/device" > /dev/null
echo "bf16 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-head.json; pack
cuda_tests 150 tests/test_devtable.py -k "gather or fill"
