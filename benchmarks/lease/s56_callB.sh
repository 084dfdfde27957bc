#!/usr/bin/env bash
# Session 56, call B (about 560 s on a fresh box), bf16 at --vram-gb 4, replayed routing, fresh processes, all five
# eval documents: (1) session 55's form (TIERED_GATHER_OVERLAP=gate_up: only gate_up beside the copy; the CPU posts
# in the step's stream, TIERED_CPU_POST_STREAM=0), (2) the down projection beside gate_up with the posts still in
# the step's stream, (3) every default (down beside gate_up, the posts on their own stream); each with the default
# row, the default/tuned row (--device-evict auto: nextuse, the router history given) and lru/device. Then the
# CUDA tests of the device step, its kernels and CPU experts (s56_callC.sh runs the other touched paths' tests).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned,lru/device"
TIMEOUT=150 TIERED_GATHER_OVERLAP=gate_up TIERED_CPU_POST_STREAM=0 offload_variant gu "$RUNS" --docs 5
TIMEOUT=150 TIERED_CPU_POST_STREAM=0 offload_variant dn "$RUNS" --docs 5
TIMEOUT=150 offload_variant all "$RUNS" --docs 5
cuda_tests 150 tests/test_gather_overlap.py tests/test_devtable.py tests/test_cpu_mailbox.py
true
