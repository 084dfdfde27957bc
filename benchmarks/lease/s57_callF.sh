#!/usr/bin/env bash
# Session 57, call F (about 600 s on a fresh box; not run: call G ran its first part): the CPU worker's variants
# (TIERED_CPU_RETUNE=0: neither remedy; the CPU-rate guard; the guard with the team pinned, TIERED_CPU_PIN=1), twice
# in alternation, five eval documents, the default and default/tuned rows (CPU experts); then call D's overlap A/B
# (three documents); then the CUDA tests of the CPU paths and the overlap. device_cpu in each run's JSON gives the
# take tables, retunes, achieved rate and pins; s57_report.py DIR DIR OUT.json reads it.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
box_topology
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
