#!/usr/bin/env bash
# Session 15, call A: the fused q4 MoE kernel (tiered/kernels/quant_moe_fused.py). First, alone on the GPU, the
# expert kernels at the 10.6B and 397B shapes: bf16, the two q4 kernels (TUNED) and the fused kernel's tile sweep;
# the fastest fused tiles are applied on the box (tools/apply_tuned.py --fused) for the runs after it. Then the
# CUDA tests of the quantized kernels beside the peers checkpoint and its q4+q4 and bf16 repacks (untimed); then
# the q4+q4 VRAM decode with the fused kernel on and off (TIERED_QMOE_FUSED), one process each.
source "$(dirname "$0")/lib.sh"
timeout 240 python3 benchmarks/bench_quant_kernels.py --formats q4 --quick --fused-sweep --no-dense \
  --max-seconds 200 > $OUT/qk.log 2>&1; echo "qk rc=$? $(el)"
grep -E "^experts|^fused" $OUT/qk.log | tail -45
python3 tools/apply_tuned.py $OUT/quant_kernels.json --fused | tail -3; cp tiered/kernels/quant_moe_fused.py $OUT/
mkdir -p /root/keep; cp $OUT/quant_kernels.json /root/keep/ 2>/dev/null
pack
(timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_quant_moe_fused.py \
   tests/test_quant_kernels.py > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
TESTS=$!
peers_layouts
wait $TESTS; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -14; echo "tests done $(el)"
pack
for f in 1 0; do peers_vram q4 fused$f TIERED_QMOE_FUSED=$f; done
