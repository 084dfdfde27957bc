#!/usr/bin/env bash
# Session 33, call B: the CUDA tests call A's timeout cut (repack on the GPU against the CPU at the new threshold,
# gpt-oss, the scheduler, hybrid batches, the engine's quantized kernels; the grouped kernels' new picks at the 10.6B
# and gpt-oss shapes), then mxfp4 under MANY_SWEEP at gpt-oss's shape (q4's sweep was call A's).
source "$(dirname "$0")/lib.sh"
cuda_tests 230 tests/test_quant_layout.py tests/test_gpt_oss.py tests/test_scheduler.py tests/test_batch_hybrid.py \
  tests/test_quant_kernels.py "tests/test_quant_grouped.py::test_cuda_grouped_gpt_oss_shape" \
  "tests/test_quant_grouped.py::test_cuda_grouped_quant_10b_shape"
timeout 100 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes gpt-oss --prefill-formats mxfp4 \
  --tokens 512,2048 --many-sweep --no-gemlite --max-seconds 85 > $OUT/many-mxfp4.log 2>&1
echo "many rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/many-mxfp4.json 2>/dev/null; pack
