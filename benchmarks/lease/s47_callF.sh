#!/usr/bin/env bash
# Session 47, call F: the replayed step's timeline by position (tools/profile_kernels.py --timeline: every kernel of
# the step, what it adds to the token and when it starts against everything before it), q4+q4 and bf16, to split
# _qgemv's 129 us a token between the lm_head, qkv and o_proj; then the CUDA tests of the one-sequence decode paths
# (graphs, the host a step ahead, the engine) at HEAD.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
timelines q4 bf16
cuda_tests 150 tests/test_capture.py tests/test_ahead.py tests/test_engine.py tests/test_attention_decode.py
