#!/usr/bin/env bash
# Session 24, call C: quant_matmul's tiles for the dense matrices at prefill rows. Call B found o_proj (n 2048) at
# 128 rows slower than GemLite (68.6 against 39.4 us): the experts' per-expert tile choice gave it 16 programs. The
# new default (pick_matmul_config: the largest tile with two waves of programs) against DENSE_SWEEP's tiles, the
# libraries and cuBLAS, q4, 16-2048 rows; and dequant_matmul (a dense copy by a Triton kernel, then cuBLAS).
source "$(dirname "$0")/lib.sh"
cuda_tests 150 tests/test_quant_dequant.py tests/test_quant_grouped.py -k "dense_copy or qlinear_prefill_rows"
timeout 500 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --shapes none --with-dense \
  --dense-sweep --no-gemlite --tokens 16,128,512,2048 --max-seconds 440 > $OUT/prefill-sweep.log 2>&1
echo "sweep rc=$? $(el)"; grep -vE '^\{' $OUT/prefill-sweep.log | grep -E "cuBLAS|quant_matmul +[0-9]|gemlite|tinygemm|dequant kernel|rc=|Error" | tail -40; pack
