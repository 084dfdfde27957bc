#!/usr/bin/env bash
# Session 15, call B: the fused q4 MoE restructured after call A (A: 0.51x the two kernels at its best, the time
# growing with the program's slice: a chain of dependent loads per program). Now the down slice's first step is
# loaded before gate and up, and gate/up read all of a program's rows in one pass. First the expert kernels alone
# (bf16, the two q4 kernels, the fused sweep); the fastest fused tiles are applied on the box. If the fused kernel
# beats the two kernels, the peers checkpoint and its repacks, then the VRAM decode of q4+q4 fused on / off and
# bf16 (one process each); else the CUDA tests of the quantized kernels.
source "$(dirname "$0")/lib.sh"
timeout 280 python3 benchmarks/bench_quant_kernels.py --formats q4 --quick --fused-sweep --no-dense \
  --max-seconds 250 > $OUT/qk.log 2>&1; echo "qk rc=$? $(el)"
grep -E "^experts|^fused" $OUT/qk.log | tail -32
python3 tools/apply_tuned.py $OUT/quant_kernels.json --fused | tail -1; cp tiered/kernels/quant_moe_fused.py $OUT/
pack
WIN=$(python3 -c "
import json; d = json.load(open('$OUT/quant_kernels.json')); v = d['fused_best'].get('10.6B') or {}
print(1 if (v.get('vs_two_kernels') or 0) > 1.0 else 0)")
echo "fused wins: $WIN"
if [ "$WIN" = 1 ]; then
  peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
  for f in 1 0; do peers_vram q4 fused$f TIERED_QMOE_FUSED=$f; done
  peers_vram bf16 b1
  peers_vram q4 fused1b TIERED_QMOE_FUSED=1
else
  cuda_tests 250 tests/test_quant_moe_fused.py tests/test_quant_kernels.py
fi
