#!/usr/bin/env bash
# Session 19, call C (warm box after A): VRAM decode, one process each. (1) The attention split kernel's loads before
# its PDL wait (length, block table, first tile's older keys and values; attention.PRE): bf16 with and without
# (TIERED_PRELOAD=0; bf16 runs no q4 kernel, so only the attention changes). (2) The word tile with its nibbles in
# pairs (QConfig.conv 2) in the q4+q4 decode: the lm_head alone, then every word GEMV and gate_up; the default twice.
source "$(dirname "$0")/lib.sh"
LM="gemv,q4,2048,151936:bn=32,bg=32,warps=4,algo=2,conv=2"
ALL="$LM;gemv,q4,2048,5120:bn=8,bg=32,warps=4,algo=2,regs=96,conv=2;gemv,q4,4096,2048:bn=8,bg=64,warps=4,algo=2,conv=2"
ALL="$ALL;gate_up,q4,2048,768:bn=8,bg=16,warps=4,algo=2,conv=2"
peers_vram q4 default; peers_vram bf16 default; peers_vram bf16 nopre TIERED_PRELOAD=0
peers_vram q4 pairlm TIERED_QCONFIG="$LM"; peers_vram q4 pairall TIERED_QCONFIG="$ALL"
peers_vram bf16 default2; peers_vram q4 default2; peers_vram q4 pairall2 TIERED_QCONFIG="$ALL"
peers_vram q4 pairlm16 TIERED_QCONFIG="gemv,q4,2048,151936:bn=32,bg=16,warps=4,algo=2,conv=2"
