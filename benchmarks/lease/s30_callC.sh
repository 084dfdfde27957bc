#!/usr/bin/env bash
# Session 30, call C (cold box): gpt-oss's experts through the fused decode kernels. The CUDA tests of the decode
# kernels (bf16: moe_decode; quantized: quant_moe) and of gpt-oss on CUDA (kernels against the torch expert path,
# bf16 / mxfp4 / q4 experts), then bench_gpt_oss_gpu.py: the gpt-oss-20b widths cut to 4 layers, bf16 and mxfp4
# experts, decode tok/s with the kernels against the torch expert path in the same process.
source "$(dirname "$0")/lib.sh"
cuda_tests 240 tests/test_gpt_oss.py tests/test_moe_kernels.py tests/test_quant_kernels.py \
  -k "cuda and (gpt or decode or expert_shapes or engine_runs or flat_tiles)"
timeout 330 python3 benchmarks/bench_gpt_oss_gpu.py --work /root/bench-gptoss > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | tail -12; pack
