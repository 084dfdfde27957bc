#!/usr/bin/env bash
# Session 33, call D: the CUDA tests calls A and B did not reach (the dense q4/q8 GEMMs at model shapes, the engine's
# fused kernels, the grouped kernels' new picks at the 10.6B and gpt-oss shapes), then gpt-oss's mxfp4+q8 prompts
# with the split expert tiles (TIERED_QGROUPED_INTERLEAVE=0) and the interleaved ones (the default now).
source "$(dirname "$0")/lib.sh"
cuda_tests 250 "tests/test_quant_grouped.py::test_cuda_grouped_gpt_oss_shape" \
  "tests/test_quant_grouped.py::test_cuda_grouped_quant_10b_shape" tests/test_quant_kernels.py \
  -k "gpt_oss_shape or (10b_shape and None) or qlinear_dense or engine_runs"
G=/root/bgo
for v in 0 1; do
  TIERED_QGROUPED_INTERLEAVE=$v timeout 130 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep \
    --experts mxfp4+q8 --tiles "" --no-torch --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss-il$v.log 2>&1
  echo "gptoss interleave=$v rc=$? $(el)"; grep -v '^{' $OUT/gptoss-il$v.log | grep -iE "prefill of" | tail -2
  cp $OUT/gpt_oss_gpu.json $OUT/gptoss-il$v.json 2>/dev/null; pack
done
