#!/usr/bin/env bash
# Session 20, call E (cold box), at the final commit: auto's first window now starts after the decode's first step and
# lasts 2 steps (the fill starts about 4 steps in, not 8). q4+q4 at --vram-gb 4, replayed routing: the default
# (untuned layout), default/tuned, the fill off and a fixed 7, 127 tokens; the default and default/tuned at 511; the CLI
# on the layout (its fill-order hint); the CUDA tests of the fill.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant head "default,default/tuned,lru/device,lru+fill7/device" \
  --device-fill 7 > /dev/null
echo "head $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-head.json; pack
TIMEOUT=120 LAYOUT=layout-q4 offload_variant long "default,default/tuned" --new-tokens 512 > /dev/null
echo "long $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-long.json; pack
timeout 120 python3 -m tiered run -m $W/layout-q4 --vram-gb 4 --max-new-tokens 32 --json "The quick brown fox" \
  > $OUT/cli.log 2>&1; echo "cli rc=$? $(el)"; grep -E "^tiered:" $OUT/cli.log | tail -8; tail -1 $OUT/cli.log | cut -c1-300
cuda_tests 150 tests/test_devtable.py tests/test_fillpace.py -k "gather or fill or pace"
