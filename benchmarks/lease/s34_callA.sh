#!/usr/bin/env bash
# Session 34, call A: the CUDA tests of session 33's unrun paths (the shared byte/nibble decoding of da2dc0f at the
# picks, mxfp4's many-rows tile at 64-96 rows an expert (gpt-oss T 600), repack on the GPU with its one pass over
# dense matrices), then the grouped kernels' 32-output tiles (MANY_SWEEP) for q4 and mxfp4 at the 10.6B and gpt-oss
# shapes, the dense q4 GEMM's swap-4 tiles at 300-1,024 rows, and a whole q4+q4 repack on the GPU.
source "$(dirname "$0")/lib.sh"
cuda_tests 170 "tests/test_quant_grouped.py::test_cuda_grouped_gpt_oss_shape" \
  "tests/test_quant_grouped.py::test_cuda_grouped_quant_10b_shape" \
  "tests/test_quant_layout.py::test_cuda_repack_quantizes_on_the_gpu_like_the_cpu" \
  "tests/test_quant_grouped.py::test_cuda_engine_prefill_takes_the_grouped_kernels" \
  -k "gpt_oss_shape or (10b_shape and None and 513) or repack or engine_prefill"
timeout 175 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes 10.6B,gpt-oss \
  --prefill-formats q4,mxfp4 --tokens 512,2048 --many-sweep --no-gemlite --max-seconds 160 > $OUT/many.log 2>&1
echo "many rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/many.json 2>/dev/null; pack
grep -E "auto|n32" $OUT/many.log | grep -v bf16 | cut -c1-120
timeout 100 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes none --with-dense --prefill-formats q4 \
  --tokens 300,512,1024 --many-sweep --no-gemlite --max-seconds 85 > $OUT/dense.log 2>&1
echo "dense rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/dense.json 2>/dev/null; pack
grep -E "quant_matmul|cuBLAS F" $OUT/dense.log | cut -c1-120
peers_ckpt
timeout 90 python3 benchmarks/bench_repack_gpu.py --ckpt $W/ckpt --skip-parts --out $OUT/repack.json > $OUT/repack.log 2>&1
echo "repack rc=$? $(el)"; tail -3 $OUT/repack.log | cut -c1-300; pack
