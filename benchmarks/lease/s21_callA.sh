#!/usr/bin/env bash
# Session 21, call A (cold box): the router's softmax-top-k inside resolve's launch (TIERED_TOPK_RESOLVE=1, then the
# default now) against the two launches (=0), in fresh processes, q4+q4 at --vram-gb 4, replayed routing, 127 tokens:
# the default (untuned layout), the default on a tuned layout, the fill off and a fixed 7. Then the CUDA tests of the
# device step (the captured step against the host step, with the top-k in resolve) and the kernels' sm_90 compile.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
RUNS="default,default/tuned,lru/device,lru+fill7/device"
TIERED_TOPK_RESOLVE=1 TIMEOUT=150 LAYOUT=layout-q4 offload_variant on1 "$RUNS" --device-fill 7 > /dev/null
echo "on1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-on1.json; pack
TIERED_TOPK_RESOLVE=0 TIMEOUT=150 LAYOUT=layout-q4 offload_variant off1 "$RUNS" --device-fill 7 > /dev/null
echo "off1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-off1.json; pack
cuda_tests 170 tests/test_devtable.py -k "cuda_device_step or topk"
