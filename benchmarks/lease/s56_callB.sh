#!/usr/bin/env bash
# Session 56, call B (about 600 s on a fresh box): (1) the down projection beside gate_up (TIERED_GATHER_OVERLAP=1,
# the default now) against session 55's form (gate_up only beside the copy, down waiting for it as a whole:
# TIERED_GATHER_OVERLAP=gate_up), fresh processes, all five eval documents, with --device-evict auto's
# default/tuned row (nextuse where router history exists); bf16 at --vram-gb 4, replayed routing. (2) The CUDA tests
# of every path the change touches (the device step and its kernels, CPU experts, segmented decode, the engine).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned,lru/device,nextuse+cpu/device"
TIMEOUT=170 TIERED_GATHER_OVERLAP=gate_up offload_variant gu "$RUNS" --docs 5
TIMEOUT=170 offload_variant dn "$RUNS" --docs 5
cuda_tests 260 tests/test_gather_overlap.py tests/test_devtable.py tests/test_cpu_experts.py tests/test_cpu_mailbox.py \
  tests/test_segmented_decode.py tests/test_engine.py tests/test_miss_path.py tests/test_moe_kernels.py
true
