#!/usr/bin/env bash
# Session 30, call D (cold box): gpt-oss's CUDA tests again (the quantized kernels now against the real torch
# expert path: kernels=False no longer takes the fused GEMVs), then bench_gpt_oss_gpu.py: bf16, mxfp4 and q4 experts,
# the kernels (default tiles, flat tiles, q4's word tiles) against the torch expert path.
source "$(dirname "$0")/lib.sh"
cuda_tests 100 tests/test_gpt_oss.py -k cuda
timeout 290 python3 benchmarks/bench_gpt_oss_gpu.py --work /root/bench-gptoss > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -v "attention sinks" | tail -16; pack
