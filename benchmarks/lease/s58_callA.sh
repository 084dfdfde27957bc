#!/usr/bin/env bash
# Session 58, call A (about 560 s on a fresh box): how fast the SMs can read pinned RAM (bench_h2d_read.py: the
# device step's gather against the copy engine, ld hints and TMA boxes), then bf16 at --vram-gb 4, replayed routing,
# fresh processes, three eval documents (default, default/tuned, lru/device, nextuse/device): the default against
# the probe's fastest way the engine has (TIERED_GATHER=tma:BM, TMA boxes, or 4:1024:4:l2_256 / nc_256, load hints;
# s58_pick_tma.py), when it read 8 rows at least 2% faster than the gather, and against the down projection beside
# gate_up (TIERED_GATHER_OVERLAP=down, session 57's call D, not run then). The default rows also run the probe
# windows of 9d0b55b on a GPU for the first time. Call B repeats the variants in the other order on the same warm box.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
box_topology
timeout 150 python3 benchmarks/bench_h2d_read.py --ctas 132,528 > $OUT/h2d-read.log 2>&1; echo "h2d rc=$? $(el)"
grep -E "GB/s|Error|error" $OUT/h2d-read.log | tail -40; pack
TMA=$(python3 benchmarks/lease/s58_pick_tma.py $OUT/h2d_read.json 528 1.02); echo "gather pick: '$TMA'"
echo "$TMA" > /root/tma_pick; echo "$TMA" > $OUT/tma-pick.txt
peers_ckpt; peers_layout layout source source; pack
RUNS="default,default/tuned,lru/device,nextuse/device"
TIMEOUT=130 offload_variant gua "$RUNS" --docs 3
[ -n "$TMA" ] && TIMEOUT=110 TIERED_GATHER=$TMA offload_variant tma "$RUNS" --docs 3
TIMEOUT=110 TIERED_GATHER_OVERLAP=down offload_variant dna "$RUNS" --docs 3
true
