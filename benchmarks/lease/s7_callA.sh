#!/usr/bin/env bash
# Session 7, lease call A: issue 13's q4 decode in VRAM with the word tile (quant_moe algo 2). One checkpoint (the
# 8-layer 10.6B shape, seed 0) repacked bf16 and --experts q4 --dense q4 (and --experts q4 alone); the q4 kernel
# sweep (bench_quant_kernels.py --formats q4, which now includes algo 2), its fastest deterministic tiles applied
# to this copy's TUNED (tools/apply_tuned.py; the diff comes back as tuned.diff), then bench_peers' tiered VRAM
# decode of each layout one after the other, nothing beside them.
source "$(dirname "$0")/lib.sh"
peers_ckpt
peers_layout layout source source
peers_layout layout-q4 q4 q4
timeout 200 python3 benchmarks/bench_quant_kernels.py --formats q4 > $OUT/sweep.log 2>&1; echo "sweep rc=$? $(el)"
grep -E "^ *\(|best|parts" $OUT/sweep.log | tail -20
python3 tools/apply_tuned.py $OUT/quant_kernels.json > $OUT/apply.log 2>&1; echo "apply rc=$?"; tail -c 1500 $OUT/apply.log
git diff tiered/kernels/quant_moe.py > $OUT/tuned.diff
pack
for v in q4 bf16; do
  timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "tiered $v rc=$? $(el)"; grep -iE "decode|prefill" $OUT/peers-$v.log | grep -v '^{' | tail -3
  pack
done
cp $W/tiered*.json $OUT/ 2>/dev/null
