#!/usr/bin/env bash
# Session 24, call D: the dense copy's kernel tiles (DEQUANT_SWEEP, once a matrix) and quant_matmul's new tile rule
# at 512 and 2048 rows; then the whole model: q4+q4 10.6B 8-layer model in VRAM (bench_peers' tiered phase:
# prefill of a 512-token prompt, first and warm; decode) under TIERED_DEQUANT_ROWS default (2048: the fused GEMM
# at 512 rows), 256 (the dense copy at 512 rows) and 0 (never), fresh processes.
source "$(dirname "$0")/lib.sh"
cuda_tests 150 tests/test_quant_dequant.py tests/test_quant_grouped.py -k "dense_copy or qlinear_prefill_rows"
timeout 200 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --shapes none --with-dense \
  --dense-sweep --no-gemlite --tokens 512,2048 --max-seconds 170 > $OUT/prefill-sweep.log 2>&1
echo "sweep rc=$? $(el)"; grep -vE '^\{' $OUT/prefill-sweep.log | grep -E "dense copy|quant_matmul  |dequant kernel|cuBLAS" | tail -40; pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
for tag in dflt1 dq256 never dflt2; do
  case $tag in dq256) k=256 ;; never) k=0 ;; *) k= ;; esac
  peers_vram q4 $tag TIERED_DEQUANT_ROWS=$k
  grep -iE "prefill512" $OUT/peers-q4-$tag.log | grep -v '^{' | tail -1
done
