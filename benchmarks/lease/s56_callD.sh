#!/usr/bin/env bash
# Session 56, call D (about 200 s on a fresh box): call B measured the down projection beside gate_up (one acquire
# fence per expert) 0.95x against session 55's form; the down kernel now waits once per group (the resident pairs,
# then the copied ones), opt-in (TIERED_GATHER_OVERLAP=down). First the overlap's CUDA tests, then bf16 at --vram-gb
# 4, replayed routing, fresh processes, three eval documents, without CPU experts (whose load-time probe moved the
# take table between processes in call B): the default (gate_up) against down, lru/device and nextuse/device.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 90 tests/test_gather_overlap.py
peers_ckpt; peers_layout layout source source; pack
RUNS="lru/device,nextuse/device"
TIMEOUT=80 offload_variant gu1 "$RUNS" --docs 3
TIMEOUT=80 TIERED_GATHER_OVERLAP=down offload_variant dn1 "$RUNS" --docs 3
true
