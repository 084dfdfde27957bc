#!/usr/bin/env bash
# Session 58, call B (about 330 s, on call A's warm box): call A's overlap pair in the other order (down first),
# then the CUDA tests of the overlap modes and the CPU paths.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned,lru/device,nextuse/device"
TIMEOUT=110 TIERED_GATHER_OVERLAP=down offload_variant dnb "$RUNS" --docs 3
TIMEOUT=110 offload_variant gub "$RUNS" --docs 3
cuda_tests 150 tests/test_gather_overlap.py tests/test_cpu_mailbox.py
true
