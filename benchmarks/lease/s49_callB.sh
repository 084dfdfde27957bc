#!/usr/bin/env bash
# Session 49, call B (ordered so that the decode's figures come first: the budget was short): the pre-gate (model/pregate.py, TIERED_PREGATE=1): layer l's router guessed from the
# pre-attention state in qkv's GEMV, the guessed experts' blocks asked into L2 by qk_rope's extra programs. Its CUDA
# tests first; then on the peers' q4+q4 layout: how often the guess names the router's experts (tools/pregate_hits.py),
# the VRAM decode off / on alternating (fresh processes), bf16 once with it on (bf16's 8 blocks exceed half of L2:
# it does not attach, so this is bf16's plain decode), and the replayed timeline with it on.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 off TIERED_PREGATE=0
peers_vram q4 on TIERED_PREGATE=1
peers_vram q4 off2 TIERED_PREGATE=0
peers_vram q4 on2 TIERED_PREGATE=1
peers_vram bf16 on TIERED_PREGATE=1
decode_table
timeout 100 python3 tools/pregate_hits.py -m $W/layout-q4 --tokens 32 > $OUT/pregate-hits.log 2>&1
echo "hits rc=$? $(el)"; grep -v '^{' $OUT/pregate-hits.log | tail -9; pack
cuda_tests 150 tests/test_pregate.py
timeout 120 env TIERED_PREGATE=1 python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on --timeline \
  > $OUT/timeline-pregate.log 2>&1
echo "timeline rc=$? $(el)"; grep -E "graphed step|replayed:" $OUT/timeline-pregate.log
grep -A24 "adds/tok" $OUT/timeline-pregate.log | cut -c1-100 | head -14; pack
