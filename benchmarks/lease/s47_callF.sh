#!/usr/bin/env bash
# Session 47, call F: the replayed step's timeline by position (tools/profile_kernels.py --timeline: every kernel of
# the step, what it adds to the token and when it starts against everything before it), q4+q4 and bf16, to split
# _qgemv's 129 us a token between the lm_head, qkv and o_proj; then the CUDA tests of the one-sequence decode paths
# (graphs, the host a step ahead, the engine) at HEAD.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  timeout 150 python3 tools/profile_kernels.py -m $W/$lay --tokens 16 --glue on --timeline > $OUT/timeline-$v.log 2>&1
  echo "timeline $v rc=$? $(el)"; grep -B2 -A20 "starts" $OUT/timeline-$v.log | cut -c1-100; pack
done
cuda_tests 150 tests/test_capture.py tests/test_ahead.py tests/test_engine.py tests/test_attention_decode.py
