#!/usr/bin/env bash
# Written in session 48, not yet run: register caps for the q4 decode's dense GEMVs and the Gluon gate_up
# (QConfig.regs through TIERED_QCONFIG; ptxas places loads by its register budget: session 48 found the gate_up's
# words issued in four rounds uncapped and two under 96-128). The VRAM decode of the 8-layer 10.6B shape, q4+q4,
# fresh processes, TUNED's tiles first and last; bf16 once for the ratio. Offline (sm_90, Triton 3.6): o_proj takes 96
# registers uncapped (23 CTA barriers), spills at 80 (40 bytes of stack), 128 at 128; qkv 79 at 80, 127 at 128.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
GU="gate_up,q4,2048,768:bn=64,bg=4,warps=4,algo=3,ahead=2"
OP="gemv,q4,4096,2048:bn=8,bg=64,warps=4,algo=2"
QKV="gemv,q4,2048,5120:bn=8,bg=32,warps=4,algo=2"
peers_vram q4 tuned
peers_vram q4 gu96 TIERED_QCONFIG="$GU,regs=96"
peers_vram q4 op160 TIERED_QCONFIG="$OP,regs=160"
peers_vram q4 op128 TIERED_QCONFIG="$OP,regs=128"
peers_vram q4 qkv80 TIERED_QCONFIG="$QKV,regs=80"
peers_vram q4 qkv128 TIERED_QCONFIG="$QKV,regs=128"
peers_vram q4 tuned2
peers_vram bf16 base
decode_table
