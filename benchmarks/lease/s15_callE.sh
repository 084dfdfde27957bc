#!/usr/bin/env bash
# Session 15, call E (the budget's last 160 s, most of it the cold start): call D's dense GEMV rows again, twice
# (two processes), default tiles against the register caps 80 and 96, to tell the caps' gain from run-to-run noise
# (call D's lm_head default row read 79.1 us where ncu and qlinear's row read 68-72).
source "$(dirname "$0")/lib.sh"
for i in 1 2; do
  timeout 20 python3 benchmarks/bench_quant_kernels.py --formats q4 --quick --regs 80,96 --shapes none \
    --max-seconds 18 > $OUT/qk-dense-$i.log 2>&1; echo "qk $i rc=$? $(el)"
  grep -E "^dense .* q4 " $OUT/qk-dense-$i.log | grep -v ERROR | tail -12; pack
done
