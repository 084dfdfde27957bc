#!/usr/bin/env bash
# Session 16, call B (warm box after call A: its layouts and applied tiles). VRAM decode of the 8-layer 10.6B-shape
# model, one process each: q4+q4 and bf16 with the router fused (TIERED_ROUTER=gemv, the default) and with
# cuBLAS + top-k (torch); where the tree's TUNED (call A's tiles, applied here before the call) differs from the
# tiles call A started from, q4+q4 with those too, then the tree's again; then the q4+q4 step's kernels under the
# profiler (tools/profile_kernels.py).
source "$(dirname "$0")/lib.sh"
for m in gemv torch; do peers_vram q4 router-$m TIERED_ROUTER=$m; peers_vram bf16 router-$m TIERED_ROUTER=$m; done
if ! cmp -s tiered/kernels/quant_moe.py /root/keep/quant_moe.py.orig 2>/dev/null && [ -f /root/keep/quant_moe.py.orig ]; then
  cp tiered/kernels/quant_moe.py /root/keep/quant_moe.py.tree; cp /root/keep/quant_moe.py.orig tiered/kernels/quant_moe.py
  peers_vram q4 oldtiles TIERED_ROUTER=gemv
  cp /root/keep/quant_moe.py.tree tiered/kernels/quant_moe.py
  peers_vram q4 router-gemv-2 TIERED_ROUTER=gemv
fi
timeout 90 python3 tools/profile_kernels.py -m $W/layout-q4 --glue on --tokens 16 > $OUT/profile-q4.log 2>&1
echo "profile rc=$? $(el)"; grep -vE '^\{' $OUT/profile-q4.log | tail -30; pack
