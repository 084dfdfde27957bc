#!/usr/bin/env bash
# Session 31, call A (cold box): gpt-oss's experts in the grouped kernels (biases, clamped SwiGLU) for prefill and
# batches. The CUDA tests (the grouped kernels at gpt-oss's shape in every format, gpt-oss's engine prefill and
# decode against the torch expert path, its batches on the model path, the grouped kernels' regressions, session
# 30's unrun tuned-tile test), then bench_gpt_oss_gpu.py: the gpt-oss-20b widths cut to 4 layers, bf16, mxfp4 (+ q8
# dense, llama.cpp's MXFP4_MOE mix) and q4 (+ q4 dense), prefill of 512 tokens and decode, kernels against the
# torch expert path. --keep leaves the checkpoint and layouts in /root/bgo for calls B and C.
source "$(dirname "$0")/lib.sh"
cuda_tests 200 tests/test_gpt_oss.py tests/test_quant_grouped.py tests/test_moe_kernels.py tests/test_quant_kernels.py \
  -k "gpt_oss or engine_prefill or 10b_shape or graph_capturable or grouped_cuda or tokens_path"
timeout 360 python3 benchmarks/bench_gpt_oss_gpu.py --work /root/bgo --keep --experts source,mxfp4+q8,q4+q4 \
  --tiles "" > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -v "attention sinks" | tail -14; pack
df -h /root | tail -1
