#!/usr/bin/env bash
# Session 57, call G (about 500 s on a fresh box): call F cut to what the session's device time still allowed after
# its failed starts: the CPU worker's variants (neither remedy; the team pinned one thread a physical core, with the
# guard; the guard alone) in alternation, five eval documents, then the mailbox's CUDA tests (pinning's C path).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
lscpu > $OUT/lscpu.txt 2>&1; cat /sys/devices/system/node/node*/cpulist > $OUT/nodes.txt 2>&1
for c in /sys/devices/system/cpu/cpu[0-9]*; do echo "$(basename $c) $(cat $c/topology/core_id) \
$(cat $c/topology/thread_siblings_list)"; done > $OUT/topology.txt 2>&1
python3 -c "from tiered.store.offload import worker_cpus; from tiered.store.options import physical_cores as p; \
print('cores', p(), 'pins', worker_cpus(p()))"; cat $OUT/nodes.txt
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned"
TIMEOUT=100 TIERED_CPU_RETUNE=0 offload_variant g0a "$RUNS" --docs 5
TIMEOUT=100 TIERED_CPU_PIN=1 offload_variant p1a "$RUNS" --docs 5
TIMEOUT=100 offload_variant g1a "$RUNS" --docs 5
TIMEOUT=100 TIERED_CPU_PIN=1 offload_variant p1b "$RUNS" --docs 5
TIMEOUT=100 TIERED_CPU_RETUNE=0 offload_variant g0b "$RUNS" --docs 5
cuda_tests 100 tests/test_cpu_mailbox.py
true
