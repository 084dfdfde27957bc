#!/usr/bin/env bash
# Session 57, call F (under 600 s on a fresh box): calls E and D in one, for a session whose device starts kept
# failing. First E's CPU-worker variants (neither remedy, the CPU-rate guard, the guard with the team pinned), twice
# in alternation; then D's overlap A/B (three documents); then the CUDA tests of the CPU paths and the overlap.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
lscpu > $OUT/lscpu.txt 2>&1; cat /sys/devices/system/node/node*/cpulist > $OUT/nodes.txt 2>&1
for c in /sys/devices/system/cpu/cpu[0-9]*; do echo "$(basename $c) $(cat $c/topology/core_id) \
$(cat $c/topology/thread_siblings_list)"; done > $OUT/topology.txt 2>&1
python3 -c "from tiered.store.offload import worker_cpus; from tiered.store.options import physical_cores as p; \
print('cores', p(), 'pins', worker_cpus(p()))"; cat $OUT/nodes.txt
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned"
for r in a b; do
  TIMEOUT=100 TIERED_CPU_RETUNE=0 offload_variant g0$r "$RUNS" --docs 5
  TIMEOUT=100 offload_variant g1$r "$RUNS" --docs 5
  TIMEOUT=100 TIERED_CPU_PIN=1 offload_variant p1$r "$RUNS" --docs 5
done
RUNS="lru/device,nextuse/device"
TIMEOUT=60 offload_variant gu1 "$RUNS" --docs 3
TIMEOUT=60 TIERED_GATHER_OVERLAP=down offload_variant dn1 "$RUNS" --docs 3
cuda_tests 150 tests/test_cpu_mailbox.py tests/test_gather_overlap.py tests/test_cpu_experts.py
true
