#!/usr/bin/env bash
# Session 58, call A (about 480 s on a fresh box): how fast the SMs can read pinned RAM (bench_h2d_read.py: the
# device step's gather against the copy engine, ld hints and TMA boxes), then session 57's call D, not run then:
# bf16 at --vram-gb 4, replayed routing, fresh processes, three eval documents, the default overlap (gate_up)
# against the down projection beside gate_up (TIERED_GATHER_OVERLAP=down, one wait a group), with and without CPU
# experts (default, default/tuned, lru/device, nextuse/device; the default rows also run the probe windows of
# 9d0b55b on a GPU for the first time). Call B repeats the pair in the other order on the same warm box.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
box_topology
timeout 120 python3 benchmarks/bench_h2d_read.py --ctas 132,528 > $OUT/h2d-read.log 2>&1; echo "h2d rc=$? $(el)"
grep -E "GB/s|Error|error" $OUT/h2d-read.log | tail -40; pack
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned,lru/device,nextuse/device"
TIMEOUT=130 offload_variant gua "$RUNS" --docs 3
TIMEOUT=110 TIERED_GATHER_OVERLAP=down offload_variant dna "$RUNS" --docs 3
true
