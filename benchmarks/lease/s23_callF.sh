#!/usr/bin/env bash
# Session 23, call F (cold box): the filling steps without resolve. While the copy fill's plan of every key is in
# flight nothing is evicted, so those steps look their slots up too (a planned key loads into its reserved slot,
# the gather copies it). First the CUDA tests of the captured step with the copy fill (real routing: the router's
# softmax-top-k loads them) and with replayed routing; then q4+q4 at --vram-gb 4, replayed routing, 127 tokens, the
# default against TIERED_COMPLETE_STEP=after (calls A-E's code: resolve in the filling steps), fresh processes.
source "$(dirname "$0")/lib.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_devtable.py \
  -k "cuda_device_step_fill_matches_host_step or cuda_device_step_replayed_routing or lookup_kernel" \
  > $OUT/cuda-tests.log 2>&1
echo "rc=$?" >> $OUT/cuda-tests.log; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -8
echo "tests $(el)"; pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=120 LAYOUT=layout-q4 offload_variant p1 "default" > /dev/null
echo "p1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-p1.json; pack
TIERED_COMPLETE_STEP=after TIMEOUT=120 LAYOUT=layout-q4 offload_variant a1 "default" > /dev/null
echo "a1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-a1.json; pack
TIMEOUT=120 LAYOUT=layout-q4 offload_variant p2 "default" > /dev/null
echo "p2 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-p2.json; pack
TIERED_COMPLETE_STEP=after TIMEOUT=120 LAYOUT=layout-q4 offload_variant a2 "default" > /dev/null
echo "a2 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-a2.json; pack
