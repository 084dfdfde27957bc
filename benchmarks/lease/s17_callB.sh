#!/usr/bin/env bash
# Session 17, call B (warm box after A, its layouts): VRAM decode of the 8-layer 10.6B-shape model, one process each:
# q4+q4 with the preload before the PDL wait (the default) and without it (TIERED_PRELOAD=0), bf16, q4+q4 with o_proj
# read in one step (so its whole row is preloaded; TIERED_QCONFIG), q4+q4 default again (order effects); the q4+q4
# step's kernels under the profiler; the q4+q4 and bf16 offload at --vram-gb 4 with replayed routing.
source "$(dirname "$0")/lib.sh"
peers_vram q4 default; peers_vram q4 nopre TIERED_PRELOAD=0; peers_vram bf16 default
peers_vram q4 oproj1 TIERED_QCONFIG="gemv,q4,4096,2048:bn=8,bg=64,warps=4,algo=2"
peers_vram q4 default2
timeout 60 python3 tools/profile_kernels.py -m $W/layout-q4 --glue on --tokens 16 > $OUT/profile-q4.log 2>&1
echo "profile rc=$? $(el)"; grep -vE '^\{' $OUT/profile-q4.log | grep -v -i warn | tail -22; pack
LAYOUT=layout-q4 offload_variant default "default,lru/device"
offload_variant default "default,lru/device"
