#!/usr/bin/env bash
# Session 18, call C (warm box after A, its layouts; or cold: the layouts are made first): the word tile with its
# nibbles in pairs (QConfig.conv 2: one shift per two inputs; offline under Triton 3.6 the lm_head tile drops from
# 2,160 to 1,960 SASS instructions, 4.22 to 3.83 per input, at the same 168 registers) in the q4+q4 VRAM decode:
# the lm_head alone, then every word-tile GEMV and gate_up; TUNED's tiles otherwise; bf16 in the same call; then
# the CUDA tests of the pairs against the reference.
source "$(dirname "$0")/lib.sh"
peers_layouts
LM="gemv,q4,2048,151936:bn=32,bg=32,warps=4,algo=2,conv=2"
ALL="$LM;gemv,q4,2048,5120:bn=8,bg=32,warps=4,algo=2,regs=96,conv=2;gemv,q4,4096,2048:bn=8,bg=64,warps=4,algo=2,conv=2"
ALL="$ALL;gate_up,q4,2048,768:bn=8,bg=16,warps=4,algo=2,conv=2"
peers_vram q4 default; peers_vram q4 pairlm TIERED_QCONFIG="$LM"; peers_vram q4 pairall TIERED_QCONFIG="$ALL"
peers_vram q4 default2; peers_vram bf16 default; peers_vram q4 pairall2 TIERED_QCONFIG="$ALL"
# the lm_head's pairs at fewer registers (offline, Triton 3.6): bg 16 128 registers (4 programs a SM, 3.97 SASS an
# input), a cap of 128 at bg 32 (4.27), bn 16 96 registers (5 programs, 4.5)
peers_vram q4 pairlm16 TIERED_QCONFIG="gemv,q4,2048,151936:bn=32,bg=16,warps=4,algo=2,conv=2"
peers_vram q4 pairlm128 TIERED_QCONFIG="gemv,q4,2048,151936:bn=32,bg=32,warps=4,algo=2,conv=2,regs=128"
peers_vram q4 pairlmbn16 TIERED_QCONFIG="gemv,q4,2048,151936:bn=16,bg=32,warps=4,algo=2,conv=2"
cuda_tests 200 tests/test_quant_kernels.py -k "words or pairs or experts_match"
