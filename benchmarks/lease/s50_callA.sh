#!/usr/bin/env bash
# Written in session 49, run in session 50 (with a bf16 run added for the ratio at HEAD): the pre-gate (model/pregate.py) with line prefetches (TIERED_PREGATE=lines)
# against bulk copies (=1, measured 0.949x in s49 call C: qk_rope's span grew by about the prefetch's HBM time) and
# off, on the q4+q4 VRAM decode of the 8-layer 10.6B shape, fresh processes alternating; then the timeline with lines
# and the pre-gate's CUDA tests (equal tokens on / off, bulk and lines).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 off TIERED_PREGATE=0
peers_vram bf16 base
peers_vram q4 lines TIERED_PREGATE=lines
peers_vram q4 bulk TIERED_PREGATE=1
peers_vram q4 off2 TIERED_PREGATE=0
peers_vram q4 lines2 TIERED_PREGATE=lines
decode_table
timeout 120 env TIERED_PREGATE=lines python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on \
  --timeline > $OUT/timeline-lines.log 2>&1
echo "timeline rc=$? $(el)"; grep -E "graphed step|replayed:" $OUT/timeline-lines.log
grep -A13 "starts" $OUT/timeline-lines.log | cut -c1-100; pack
cuda_tests 200 tests/test_pregate.py
