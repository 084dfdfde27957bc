#!/usr/bin/env bash
# (The fused kernel it measured was slower than resolve + gather and was reverted after call D: to rerun, check
# out the commit the call ran at, a5a733a for C and 8140bd6 for D.)
# Session 9, lease call D: the fused resolve-and-gather with a generation flag (no atomics but program 0's release;
# call C's exit-count design measured slower than the two kernels). Its CUDA tests alone first, then the checkpoint
# and both repacks, then the q4 offload with the fused kernel off (TIERED_FUSED_RESOLVE=0: resolve + gather) and on,
# and the bf16 offload (fused), each device run profiled on the warm cache.
source "$(dirname "$0")/lib.sh"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py tests/test_ahead.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -8; echo "tests done $(el)"; pack
peers_layouts
for f in 0 1; do
  export TIERED_FUSED_RESOLVE=$f
  peers_offload layout-q4 "lru/device,nextuse/device" --profile lru/device,nextuse/device
  for x in log json; do cp $OUT/offload-layout-q4.$x $OUT/offload-layout-q4-fused$f.$x; done
done
export TIERED_FUSED_RESOLVE=1
peers_offload layout "lru/device,nextuse/device" --profile nextuse/device
