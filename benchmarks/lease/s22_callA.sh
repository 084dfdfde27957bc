#!/usr/bin/env bash
# Session 22, call A (cold box): the copy-engine fill (--device-fill copy: cudaMemcpyAsync on a side stream outside
# the step's graph, a plan made at the decode's start, each step's first kernel entering what landed). First its
# tests on the GPU (the kernels on CUDA against the reference, the eager step, the captured step against the host
# step, the sm_90 compile); then q4+q4 at --vram-gb 4, replayed routing, 127 tokens, in one fresh process: the
# default (auto, untuned layout), the default on a tuned layout, a fixed 7 (popularity order), copy in popularity
# order and copy in expert-id order.
source "$(dirname "$0")/lib.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_devtable.py \
  -k "copy or cuda_device_step_fill or compile_for_sm90" > $OUT/cuda-tests.log 2>&1
echo "rc=$?" >> $OUT/cuda-tests.log; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -14
echo "tests $(el)"; pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
RUNS="default,default/tuned,lru+fill7/device,lru+fillcopy/device,lru+fillcopyid/device"
TIMEOUT=240 LAYOUT=layout-q4 offload_variant a1 "$RUNS" --device-fill 7,copy,copy/id > /dev/null
echo "a1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-a1.json; pack
