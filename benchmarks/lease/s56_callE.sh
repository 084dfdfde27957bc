#!/usr/bin/env bash
# Session 56, call E (about 330 s on a fresh box): the CPU-rate guard (the take table lowered while the worker's
# achieved rate is below 0.8 of the rate the load-time table assumed; built after the last lease, not yet run on a
# GPU) against TIERED_CPU_RETUNE=0, twice in alternation, fresh processes, five eval documents, bf16 at --vram-gb 4,
# replayed routing: the default row (lru with CPU experts) and default/tuned (nextuse with CPU experts). Call B saw
# the worker's time an expert range 83-239 us between processes on one box; device_cpu in each run's JSON gives the
# take tables, the retunes and the achieved rate.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned"
TIMEOUT=130 TIERED_CPU_RETUNE=0 offload_variant g0a "$RUNS" --docs 5
TIMEOUT=130 offload_variant g1a "$RUNS" --docs 5
TIMEOUT=130 TIERED_CPU_RETUNE=0 offload_variant g0b "$RUNS" --docs 5
TIMEOUT=130 offload_variant g1b "$RUNS" --docs 5
cuda_tests 120 tests/test_cpu_mailbox.py tests/test_cpu_experts.py
true
