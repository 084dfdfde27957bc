#!/usr/bin/env bash
# Session 57, call E (about 450 s on a warm box): the CPU worker's rate between processes. Session 56's call B saw the
# worker's time an expert range 83-239 us between processes on one box. Two remedies, in alternation, fresh
# processes, five eval documents, bf16 at --vram-gb 4, replayed routing, the default row (lru with CPU experts) and
# default/tuned (nextuse with CPU experts): TIERED_CPU_RETUNE=0 (neither: session 56's default before the guard),
# the CPU-rate guard (the default), and the guard with the worker's team pinned one thread a physical core
# (TIERED_CPU_PIN=1). device_cpu in each run's JSON gives the take tables, retunes, achieved rate and pins.
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
  TIMEOUT=130 TIERED_CPU_RETUNE=0 offload_variant g0$r "$RUNS" --docs 5
  TIMEOUT=130 offload_variant g1$r "$RUNS" --docs 5
  TIMEOUT=130 TIERED_CPU_PIN=1 offload_variant p1$r "$RUNS" --docs 5
done
true
