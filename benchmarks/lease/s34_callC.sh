#!/usr/bin/env bash
# Session 34, call C: the dense copy's kernel now reads quant_grouped's weight tile (scales once a group), and qlinear
# takes the copy + cuBLAS from 257 rows (was 2,048). CUDA tests of the copy and of qlinear's rows; the copy under
# DEQUANT_SWEEP's blocks and qlinear / quant_matmul / copy + cuBLAS at 128-1,024 rows of the 10.6B dense matrices
# (q4, q8); then the 8-layer 10.6B q4+q4 in VRAM (512-token prefill, decode) with the new threshold and the old.
source "$(dirname "$0")/lib.sh"
cuda_tests 80 tests/test_quant_dequant.py "tests/test_quant_grouped.py::test_cuda_qlinear_prefill_rows"
timeout 110 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes none --with-dense \
  --prefill-formats q4,q8 --tokens 128,256,300,512,1024 --dequant-sweep --no-gemlite --max-seconds 95 \
  > $OUT/dense.log 2>&1
echo "dense rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/dense.json 2>/dev/null; pack
grep -E "qlinear|dequant kernel|dense copy|cuBLAS F|quant_matmul " $OUT/dense.log | sed 's/  */ /g' | cut -c1-90
peers_ckpt; peers_layout layout-q4 q4 q4; pack
peers_vram q4 rows257
grep -iE "prefill512" $OUT/peers-q4-rows257.log | grep -v '^{' | tail -2
peers_vram q4 rows2048 TIERED_DEQUANT_ROWS=2048
grep -iE "prefill512" $OUT/peers-q4-rows2048.log | grep -v '^{' | tail -2
