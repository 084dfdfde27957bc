#!/usr/bin/env bash
# (The fused kernel it measured was slower than resolve + gather and was reverted after call D: to rerun, check
# out the commit the call ran at, a5a733a for C and 8140bd6 for D.)
# Session 9, lease call C: the fused resolve-and-gather (one launch a layer fewer in the device step). Its CUDA tests
# alone first (test_devtable: the fused kernel against the reference, the device steps against the host step;
# test_pdl, test_ahead), then the checkpoint and both repacks, then call B's offload runs again with the profile.
source "$(dirname "$0")/lib.sh"
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py tests/test_pdl.py \
  tests/test_ahead.py > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -8; echo "tests done $(el)"; pack
peers_layouts
peers_offload layout-q4 "lru/device,nextuse/device" --profile lru/device
peers_offload layout "lru/device,nextuse/device" --profile nextuse/device
