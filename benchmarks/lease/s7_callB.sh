#!/usr/bin/env bash
# Session 7, lease call B: the word tile's down kernel over all K experts at once (quant_moe._down_words). As call
# A: checkpoint, bf16 and q4+q4 repacks, the q4 sweep and its tiles applied to this copy (tuned.diff), then the
# tiered VRAM decode of q4 and bf16 one after the other, the q4 step's kernel profile (tools/profile_kernels.py,
# glue on), and the CUDA tests of the quantized kernels last (nothing timed beside them).
source "$(dirname "$0")/lib.sh"
peers_ckpt
peers_layout layout source source
peers_layout layout-q4 q4 q4
timeout 200 python3 benchmarks/bench_quant_kernels.py --formats q4 > $OUT/sweep.log 2>&1; echo "sweep rc=$? $(el)"
grep -E "parts|a2 .* \| down" $OUT/sweep.log | grep -v '^{' | tail -24
python3 tools/apply_tuned.py $OUT/quant_kernels.json > $OUT/apply.log 2>&1; echo "apply rc=$?"; grep -v '^{' $OUT/apply.log
git diff tiered/kernels/quant_moe.py > $OUT/tuned.diff
pack
for v in q4 bf16; do
  timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "tiered $v rc=$? $(el)"; grep -iE "decode|prefill" $OUT/peers-$v.log | grep -v '^{' | tail -3
  cp $W/tiered*.json $OUT/ 2>/dev/null; pack
done
timeout 120 python3 tools/profile_kernels.py -m $W/layout-q4 --glue on --tokens 16 > $OUT/profile-q4.log 2>&1
echo "profile rc=$? $(el)"; grep -v '^{' $OUT/profile-q4.log | head -32; pack
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_quant_kernels.py \
   > $OUT/cuda-quant-tests.log 2>&1; echo "tests rc=$? $(el)"; tail -5 $OUT/cuda-quant-tests.log
