#!/usr/bin/env bash
# Session 35, call D: the scales a step ahead (GroupedConfig.ps 1) in the split tiles (swap 0: q4 at <= 16 rows an
# expert, q8 and fp8 everywhere, mxfp4 at 17-63) and quant_matmul's: CUDA tests, then the kernel bench with
# --ps-sweep (each pick against itself with ps flipped) under the reference routing at the 10.6B shape, and
# batches of 32 and 128 rows (q4+q4) with TIERED_QGROUPED_PS=1 against the default.
source "$(dirname "$0")/lib.sh"
cuda_tests 90 "tests/test_quant_grouped.py::test_cuda_grouped_quant_10b_shape" \
  "tests/test_quant_grouped.py::test_cuda_quant_matmul_interleaved" -k "0ps1 or 1ps1 or interleaved"
timeout 130 python3 benchmarks/bench_quant_kernels.py --phase prefill --routing replay --text .carry/shared/text/fit \
  --shapes 10.6B --prefill-formats q4,q8,mxfp4 --tokens 16,128,2048 --ps-sweep --no-gemlite --max-seconds 120 \
  > $OUT/ps0.log 2>&1
echo "ps0 rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/ps0.json 2>/dev/null; pack
grep -E "auto|ps" $OUT/ps0.log | grep grouped | grep -vE " m(64|128) n(64|128) k64 w(4|8) s(3|4) swap(4|5) ps" | \
  cut -c1-130 | head -40
peers_ckpt; peers_layout layout-q4 q4 q4; pack
BATCH_TIMEOUT=70 batch_vram q4-ps0 layout-q4 32,128 graphs
BATCH_TIMEOUT=70 batch_vram q4-ps1 layout-q4 32,128 graphs TIERED_QGROUPED_PS=1
