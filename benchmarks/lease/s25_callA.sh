#!/usr/bin/env bash
# Session 25, call A: split-K for quant_matmul (the dense q4 GEMM at 8-256 rows, where GemLite led): its CUDA tests,
# then the dense prefill rows of the 10.6B qkv and o_proj (lm_head without the sweep) with SPLIT_TILES x SPLITS,
# qlinear (the model's path at each T), GemLite and tinygemm on the same parts, cuBLAS bf16.
source "$(dirname "$0")/lib.sh"
cuda_tests 230 tests/test_quant_grouped.py -k "split_k or (qlinear_prefill_rows and q4)"
timeout 300 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --shapes none --with-dense \
  --split-sweep --no-gemlite --tokens 8,16,32,64,128,256 --max-seconds 280 > $OUT/split.log 2>&1
echo "split sweep rc=$? $(el)"; grep -vE '^\{' $OUT/split.log | grep -E "qlinear|quant_matmul  |gemlite|tinygemm|cuBLAS F" | tail -60
pack
