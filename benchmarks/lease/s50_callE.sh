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
peers_vram q4 off TIERED_TOPK_FOLD=0
peers_vram q4 fold TIERED_TOPK_FOLD=1
peers_vram q4 off2 TIERED_TOPK_FOLD=0
peers_vram q4 fold2 TIERED_TOPK_FOLD=1
decode_table
timeout 60 env TIERED_TOPK_FOLD=1 python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on \
  --timeline > $OUT/timeline-fold.log 2>&1
echo "timeline rc=$? $(el)"; grep -E "graphed step|replayed:" $OUT/timeline-fold.log
grep -A13 "starts" $OUT/timeline-fold.log | cut -c1-100; pack
timeout 90 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_quant_kernels.py \
  tests/test_quant_gluon_moe.py -k "down_folds or decode_folds" > $OUT/cuda-tests.log 2>&1
echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -8; echo "tests done $(el)"; pack
