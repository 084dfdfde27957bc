#!/usr/bin/env bash
# Session 57, call D (about 330 s on a fresh box): session 56's call D, not run then, plus the CPU paths' CUDA tests.
# First the CUDA tests of the overlap modes, the mailbox (now with pinning) and the CPU experts; then bf16 at
# --vram-gb 4, replayed routing, fresh processes, three eval documents, without CPU experts: the default overlap
# (gate_up) against the down projection beside gate_up (TIERED_GATHER_OVERLAP=down, one wait a group), lru/device
# and nextuse/device.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
lscpu > $OUT/lscpu.txt 2>&1; grep -E "^(CPU\(s\)|Thread|Core|Socket|NUMA|Model name)" $OUT/lscpu.txt
cuda_tests 200 tests/test_gather_overlap.py tests/test_cpu_mailbox.py tests/test_cpu_experts.py
peers_ckpt; peers_layout layout source source; pack
RUNS="lru/device,nextuse/device"
TIMEOUT=80 offload_variant gu1 "$RUNS" --docs 3
TIMEOUT=80 TIERED_GATHER_OVERLAP=down offload_variant dn1 "$RUNS" --docs 3
true
