#!/usr/bin/env bash
# Session 50, call E: the folded top-k with down ranking the router's logits itself before its wait (quant_down's
# fold: its slots and first codes loaded early again; call D's down read them after its wait, +1.2 us a layer)
# against the two launches, on the q4+q4 VRAM decode of the 8-layer 10.6B shape, fresh processes alternating, bf16
# for the ratio; the timeline with the fold; the fold's CUDA tests.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 off TIERED_TOPK_FOLD=0
peers_vram q4 fold TIERED_TOPK_FOLD=1
peers_vram bf16 base
peers_vram q4 off2 TIERED_TOPK_FOLD=0
peers_vram q4 fold2 TIERED_TOPK_FOLD=1
decode_table
timeout 120 env TIERED_TOPK_FOLD=1 python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on \
  --timeline > $OUT/timeline-fold.log 2>&1
echo "timeline rc=$? $(el)"; grep -E "graphed step|replayed:" $OUT/timeline-fold.log
grep -A13 "starts" $OUT/timeline-fold.log | cut -c1-100; pack
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_quant_gluon_moe.py tests/test_quant_kernels.py \
  -k "fold" > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -8; echo "tests done $(el)"; pack
