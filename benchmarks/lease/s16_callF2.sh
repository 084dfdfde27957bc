#!/usr/bin/env bash
# Session 16, call F2 (warm box after F1, its layouts): VRAM decode of the 8-layer 10.6B-shape model, one process
# each, every option at its default (the norm-in router with the gemv top-k): q4+q4 and bf16, then q4+q4 and bf16
# again with TIERED_ROUTER=torch (cuBLAS router, separate add+norm) and q4+q4 with TIERED_ROUTER=fused; the q4+q4
# step's kernels under the profiler last.
source "$(dirname "$0")/lib.sh"
peers_vram q4 default; peers_vram bf16 default
peers_vram q4 router-torch TIERED_ROUTER=torch; peers_vram bf16 router-torch TIERED_ROUTER=torch
peers_vram q4 router-fused TIERED_ROUTER=fused
timeout 60 python3 tools/profile_kernels.py -m $W/layout-q4 --glue on --tokens 16 > $OUT/profile-q4.log 2>&1
echo "profile rc=$? $(el)"; grep -vE '^\{' $OUT/profile-q4.log | grep -v -i warn | tail -22; pack
