#!/usr/bin/env bash
# Session 45, call C: TUNED's new gate_up entry (the Gluon gate_up of quant_gluon_moe at the 10.6B shape: 4 groups a
# step, 2 steps a load) as the default, against the word tile it replaced (TIERED_QCONFIG), in the VRAM decode of
# the 8-layer 10.6B shape, q4+q4, alternating fresh processes twice; bf16 once for the ratio; then the CUDA tests of
# quant_gluon_moe.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
WORD="gate_up,q4,2048,768:bn=8,bg=16,warps=4,algo=2"
peers_layouts
peers_vram q4 tuned
peers_vram q4 word TIERED_QCONFIG="$WORD"
peers_vram q4 tuned2
peers_vram q4 word2 TIERED_QCONFIG="$WORD"
peers_vram bf16 base
decode_table
pack
cuda_tests 100 tests/test_quant_gluon_moe.py
