#!/usr/bin/env bash
# Session 56, call B (about 520 s on a fresh box). First the CUDA tests of every path session 56's changes touch
# (the device step and its kernels, CPU experts, segmented decode, the engine, the miss path, the MoE kernels). Then
# bf16 at --vram-gb 4, replayed routing, fresh processes, all five eval documents: (1) session 55's form
# (TIERED_GATHER_OVERLAP=gate_up: only gate_up beside the copy; the CPU posts in the step's stream,
# TIERED_CPU_POST_STREAM=0), (2) the down projection beside gate_up with the posts still in the step's stream,
# (3) every default (down beside gate_up, the posts on their own stream); each with the default row (lru: no router
# history) and the default/tuned row (--device-evict auto: nextuse, the router history given).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 240 tests/test_gather_overlap.py tests/test_devtable.py tests/test_cpu_mailbox.py tests/test_cpu_experts.py \
  tests/test_segmented_decode.py tests/test_engine.py tests/test_miss_path.py tests/test_moe_kernels.py
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned"
TIMEOUT=130 TIERED_GATHER_OVERLAP=gate_up TIERED_CPU_POST_STREAM=0 offload_variant gu "$RUNS" --docs 5
TIMEOUT=130 TIERED_CPU_POST_STREAM=0 offload_variant dn "$RUNS" --docs 5
TIMEOUT=130 offload_variant all "$RUNS" --docs 5
true
