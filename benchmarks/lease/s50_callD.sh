#!/usr/bin/env bash
# Ran at 2b61897 (TIERED_TOPK_FOLD exists only there and at da28a54: reverted after call E; check out that commit).
# Session 50, call D: the softmax-top-k folded into the Gluon gate_up (TIERED_TOPK_FOLD=1: each program ranks the
# router's logits after its wait and program (0, 0) writes the ids and weights; no top-k launch, and down reads its
# slots and weights after its wait) against the two launches, on the q4+q4 VRAM decode of the 8-layer 10.6B shape,
# fresh processes alternating; the timeline with the fold; the Gluon kernels' CUDA tests (the fold's included).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
q4_ab TIERED_TOPK_FOLD
timeline_with fold 120 TIERED_TOPK_FOLD=1
cuda_tests 240 tests/test_quant_gluon_moe.py
