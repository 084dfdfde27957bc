#!/usr/bin/env bash
# Session 33, call A: the CUDA tests of session 32's unrun mends and of this session's kernels (sinkflash, the
# quantized grouped kernels with the interleaved weight tile, swap 4 / 5; repack on the GPU against the CPU;
# gpt-oss; the scheduler), then the grouped kernels at many rows an expert: MANY_SWEEP's tiles against the pick,
# q4 at the 10.6B and gpt-oss expert shapes, and the dense q4 GEMM's swap-4 tiles (--with-dense).
source "$(dirname "$0")/lib.sh"
cuda_tests 250 tests/test_sinkflash.py tests/test_quant_layout.py tests/test_quant_grouped.py tests/test_gpt_oss.py \
  tests/test_scheduler.py tests/test_batch_hybrid.py
timeout 170 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes 10.6B,gpt-oss --prefill-formats q4 \
  --tokens 512,2048 --many-sweep --no-gemlite --max-seconds 150 > $OUT/many.log 2>&1
echo "many rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/many.json 2>/dev/null; pack
timeout 120 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes none --with-dense --prefill-formats q4 \
  --tokens 512,2048 --many-sweep --no-gemlite --max-seconds 100 > $OUT/dense.log 2>&1
echo "dense rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/dense.json 2>/dev/null; pack
