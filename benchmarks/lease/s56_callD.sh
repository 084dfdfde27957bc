#!/usr/bin/env bash
# Session 56, call D (about 380 s on a fresh box): call B measured the down projection beside gate_up (one acquire
# fence per expert) 0.95x against session 55's form; the down kernel now waits once per group (the resident pairs,
# then the copied ones). First the overlap's CUDA tests, then bf16 at --vram-gb 4, replayed routing, fresh processes,
# all five eval documents, without CPU experts (whose load-time probe moved the take table between processes in call
# B): TIERED_GATHER_OVERLAP=gate_up against the default, twice in alternation, lru/device and nextuse/device.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 90 tests/test_gather_overlap.py
peers_ckpt; peers_layout layout source source; pack
RUNS="lru/device,nextuse/device"
TIMEOUT=100 TIERED_GATHER_OVERLAP=gate_up offload_variant gu1 "$RUNS" --docs 5
TIMEOUT=100 offload_variant dn1 "$RUNS" --docs 5
TIMEOUT=100 TIERED_GATHER_OVERLAP=gate_up offload_variant gu2 "$RUNS" --docs 5
TIMEOUT=100 offload_variant dn2 "$RUNS" --docs 5
true
