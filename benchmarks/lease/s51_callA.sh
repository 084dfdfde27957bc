#!/usr/bin/env bash
# Written in session 50, not yet run: the folded top-k (TIERED_TOPK_FOLD=1) with down ranking the router's logits
# itself before its wait, per-k sums (session 50's call E took a [K, E] selection that Triton 3.6 put on the stack:
# 520 us a layer) against the two launches, on the q4+q4 VRAM decode of the 8-layer 10.6B shape, fresh processes
# alternating, bf16 for the ratio; the timeline with the fold; the fold's CUDA tests. If it beats off by more than
# noise, make it the default (quant_gluon_moe.fold_enabled) and time it again with replayed routing.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 off TIERED_TOPK_FOLD=0
peers_vram q4 fold TIERED_TOPK_FOLD=1
peers_vram bf16 base
peers_vram q4 off2 TIERED_TOPK_FOLD=0
peers_vram q4 fold2 TIERED_TOPK_FOLD=1
decode_table
box_tests 150 tests/test_quant_kernels.py tests/test_quant_gluon_moe.py -k "fold"
timeline_with fold 60 TIERED_TOPK_FOLD=1
