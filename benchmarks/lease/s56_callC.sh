#!/usr/bin/env bash
# Session 56, call C (about 250 s on a fresh box): the CUDA tests of the other paths session 56's changes touch
# (CPU experts in bf16, segmented decode, the engine, the miss path, the MoE kernels).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 220 tests/test_cpu_experts.py tests/test_segmented_decode.py tests/test_engine.py tests/test_miss_path.py \
  tests/test_moe_kernels.py
true
