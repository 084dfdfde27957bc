#!/usr/bin/env bash
# Session 57, call G (about 500 s on a fresh box): call F cut to what the session's device time still allowed after
# its failed starts: the CPU worker's variants (neither remedy; the team pinned one thread a physical core, with the
# guard; the guard alone) in alternation, five eval documents, then the mailbox's CUDA tests (pinning's C path).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
box_topology
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned"
TIMEOUT=100 TIERED_CPU_RETUNE=0 offload_variant g0a "$RUNS" --docs 5
TIMEOUT=100 TIERED_CPU_PIN=1 offload_variant p1a "$RUNS" --docs 5
TIMEOUT=100 offload_variant g1a "$RUNS" --docs 5
TIMEOUT=100 TIERED_CPU_PIN=1 offload_variant p1b "$RUNS" --docs 5
TIMEOUT=100 TIERED_CPU_RETUNE=0 offload_variant g0b "$RUNS" --docs 5
cuda_tests 100 tests/test_cpu_mailbox.py
true
