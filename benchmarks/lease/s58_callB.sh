#!/usr/bin/env bash
# Session 58, call B (about 450 s, on call A's warm box): call A's variants in the other order (down, call A's
# picked gather when it picked one, then the default), then the CUDA tests of the overlap modes (with the TMA gather's).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
TMA=$(cat /root/tma_pick 2>/dev/null); echo "gather pick: '$TMA'"
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned,lru/device,nextuse/device"
TIMEOUT=110 TIERED_GATHER_OVERLAP=down offload_variant dnb "$RUNS" --docs 3
[ -n "$TMA" ] && TIMEOUT=110 TIERED_GATHER=$TMA offload_variant tmb "$RUNS" --docs 3
TIMEOUT=110 offload_variant gub "$RUNS" --docs 3
cuda_tests 150 tests/test_gather_overlap.py
true
