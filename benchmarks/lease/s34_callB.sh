#!/usr/bin/env bash
# Session 34, call B: the dense quantized GEMM (quant_matmul) with its weight tile the MMA's first operand (swap 5,
# new) against swap 4, the pick and the dense copy through cuBLAS, q4 and q8, at 300-2,047 rows of the 10.6B qkv,
# o_proj and lm_head; then the CUDA tests of swap 5 at those shapes.
source "$(dirname "$0")/lib.sh"
timeout 250 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes none --with-dense \
  --prefill-formats q4,q8 --tokens 300,512,1024,2047 --many-sweep --no-gemlite --max-seconds 235 > $OUT/dense.log 2>&1
echo "dense rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/dense.json 2>/dev/null; pack
grep -E "quant_matmul|cuBLAS|qlinear" $OUT/dense.log | sed 's/  */ /g' | cut -c1-100
cuda_tests 120 "tests/test_quant_grouped.py::test_cuda_quant_matmul_interleaved"
