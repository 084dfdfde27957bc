#!/usr/bin/env bash
# Session 41, call A: the q4 kernels with 8-bit inputs (QConfig.act 1, dp4a; TIERED_GPU_ACT=q8). First their CUDA
# tests (tests/test_gpu_act_q8.py: the inline dp4a against the rounded reference at the 10.6B and 397B shapes, in a
# graph), then benchmarks/bench_act8_gpu.py: each decode product of the 10.6B shape (lm_head, qkv, o_proj, one
# token's 8 experts) with float inputs under TUNED's tiles against act 1 under a few tiles -> act8_kernels.json,
# whose "qconfig" call B reads for its end-to-end run.
source "$(dirname "$0")/lib.sh"
cuda_tests 150 tests/test_gpu_act_q8.py
timeout 300 python3 benchmarks/bench_act8_gpu.py > $OUT/act8-kernels.log 2>&1
echo "act8 kernels rc=$? $(el)"; grep -vE '^\{' $OUT/act8-kernels.log | tail -12; pack
