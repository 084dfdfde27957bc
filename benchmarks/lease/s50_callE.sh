#!/usr/bin/env bash
# Ran at da28a54 (TIERED_TOPK_FOLD exists only there and at 2b61897: reverted after this call; check out that commit).
# Session 50, call E (trimmed to the budget left): the folded top-k with down ranking the router's logits itself
# before its wait (quant_down's fold: its slots and first codes loaded early again; call D's down read them after
# its wait, +1.2 us a layer) against the two launches, on the q4+q4 VRAM decode of the 8-layer 10.6B shape, fresh
# processes alternating; the timeline with the fold; the fold's tests on CUDA (down's against the unfolded launch,
# the reference model's greedy tokens with and without).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
q4_ab TIERED_TOPK_FOLD
timeline_with fold 60 TIERED_TOPK_FOLD=1
box_tests 90 tests/test_quant_kernels.py tests/test_quant_gluon_moe.py -k "down_folds or decode_folds"
