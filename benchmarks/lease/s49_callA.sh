#!/usr/bin/env bash
# Session 49, call A. (1) Would L2-resident dense weights shorten the q4 step? tools/profile_kernels.py
# --share-dense (a diagnostic: every layer reads layer 0's o_proj / qkv, so those bytes stay in L2 across layers)
# against the model as it is, graphed tok/s and the replayed timeline of each. (2) Register caps for the q4 decode's
# dense GEMVs and the Gluon gate_up through TIERED_QCONFIG (written in session 48): the VRAM decode of the 8-layer
# 10.6B shape, q4+q4, fresh processes, TUNED first and last; bf16 once for the ratio. Offline (sm_90, Triton 3.6):
# o_proj takes 96 registers uncapped (23 CTA barriers), spills at 80; qkv 79 at 80, 127 at 128; gate_up 96 / 118 at
# caps 96 / 128 (both issue eight word loads before the first HMMA).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
for s in none o qkv both; do
  timeout 120 python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on --timeline --share-dense $s \
    > $OUT/timeline-share-$s.log 2>&1
  echo "share $s rc=$? $(el)"; grep -E "graphed step|replayed:" $OUT/timeline-share-$s.log
  grep -A24 "adds/tok" $OUT/timeline-share-$s.log | cut -c1-100 | head -14; pack
done
GU="gate_up,q4,2048,768:bn=64,bg=4,warps=4,algo=3,ahead=2"
OP="gemv,q4,4096,2048:bn=8,bg=64,warps=4,algo=2"
QKV="gemv,q4,2048,5120:bn=8,bg=32,warps=4,algo=2"
peers_vram q4 tuned
peers_vram q4 gu96 TIERED_QCONFIG="$GU,regs=96"
peers_vram q4 op128 TIERED_QCONFIG="$OP,regs=128"
peers_vram q4 qkv128 TIERED_QCONFIG="$QKV,regs=128"
peers_vram q4 qkv80 TIERED_QCONFIG="$QKV,regs=80"
peers_vram q4 tuned2
peers_vram bf16 base
decode_table
