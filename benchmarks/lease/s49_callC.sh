#!/usr/bin/env bash
# Session 49, call C (what 258 s of device budget allowed after the refused starts): the pre-gate's decode alone, q4+q4
# VRAM decode of the 8-layer 10.6B shape with TIERED_PREGATE off / on alternating (fresh processes), then how often
# its guess names the router's experts if time remains. bf16 (which the pre-gate does not attach to: its 8 blocks
# exceed half of L2) is call A's 1,364.3 on another box.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 off TIERED_PREGATE=0
peers_vram q4 on TIERED_PREGATE=1
peers_vram q4 off2 TIERED_PREGATE=0
peers_vram q4 on2 TIERED_PREGATE=1
decode_table
timeout 60 python3 tools/pregate_hits.py -m $W/layout-q4 --tokens 16 > $OUT/pregate-hits.log 2>&1
echo "hits rc=$? $(el)"; grep -v '^{' $OUT/pregate-hits.log | tail -9; pack
