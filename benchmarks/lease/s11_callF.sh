#!/usr/bin/env bash
# Session 11, lease call F: the split's costs from the device-side probe (post and wait kernels timed with events:
# the round trip beyond the compute, and the worker's rate times 0.85 for the gather beside it), and the worker
# that starts from the last number answered. The CUDA tests of the mailbox; the bf16 offload: lru/device,
# nextuse/device and both with CPU experts (sim_devtable.py: nextuse+cpu ahead of lru+cpu when a lone miss is copied).
source "$(dirname "$0")/lib.sh"
cuda_tests 120 tests/test_cpu_mailbox.py
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=220 offload_variant f "lru/device,nextuse/device,lru+cpu/device,nextuse+cpu/device"
