#!/usr/bin/env bash
# Session 55, call B (warm box after call A; about 250 s): the CUDA tests of the paths the overlapped gather's
# plumbing touches (CPU experts in the device step, the MoE kernels, captures), then lru/device on one document with
# --profile (its kernels a token with the overlap: gate_up beside the gather).
source "$(dirname "$0")/lib.sh"
cuda_tests 170 tests/test_cpu_mailbox.py tests/test_cpu_experts.py tests/test_moe_kernels.py tests/test_capture.py \
  tests/test_segmented_decode.py
peers_ckpt; peers_layout layout source source
TIMEOUT=90 offload_variant profile "lru/device" --profile lru/device
true
