#!/usr/bin/env bash
# Session 24, call B: the kept libraries where call A left them unmeasured. Prefill: the 10.6B dense matrices at
# 16-2048 rows, our quant_matmul against PyTorch's tinygemm and GemLite's A16W4 GEMM on the same q4 parts (call A's
# per-expert GemLite loop measured the eager loop, not the kernel). Decode: the dense GEMVs again, torchao now
# checked against its own dequantized weight (call A's check against the bf16 weights refused its rounding).
source "$(dirname "$0")/lib.sh"
timeout 300 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --shapes none --with-dense \
  --no-gemlite --tokens 16,128,512,2048 --max-seconds 240 > $OUT/prefill-dense.log 2>&1; echo "prefill rc=$? $(el)"
grep -vE '^\{' $OUT/prefill-dense.log | tail -50; pack
timeout 200 python3 benchmarks/bench_quant_kernels.py --formats q4 --shapes none --quick --max-seconds 160 \
  > $OUT/dense.log 2>&1; echo "dense rc=$? $(el)"; grep -E "^dense" $OUT/dense.log | tail -20; pack
