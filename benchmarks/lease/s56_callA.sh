#!/usr/bin/env bash
# Session 56, call A (about 420 s on a fresh box): eviction by predicted next use with its per-layer update off the
# step's path (on a stream of its own, and nt written by the update kernel: no add kernel before each resolve)
# against the update in the step's stream (TIERED_NEXT_USE_STREAM=0), fresh processes, all five eval documents:
# bf16 at --vram-gb 4, replayed routing. First the CUDA tests of the device step (the side stream decides as the
# inline update does; session 55's landed/split mend, a2507b9, not yet run on a GPU).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
cuda_tests 150 tests/test_devtable.py tests/test_gather_overlap.py
RUNS="default,lru/device,nextuse/device,nextuse+cpu/device,nextuse+pf1/device"
TIMEOUT=170 TIERED_NEXT_USE_STREAM=0 offload_variant nu0 "$RUNS" --docs 5
TIMEOUT=170 offload_variant nu1 "$RUNS" --docs 5
true
