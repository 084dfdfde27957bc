#!/usr/bin/env bash
# Session 6, lease call C: model larger than RAM with CPU experts: slice A at K = 10 from a cold page cache,
# --io direct, --cpu-experts auto on 8 cores, with a separate process locking (mlock) the RAM the laptop's share
# does not allow; raw O_DIRECT reads of the same file in the same run. The slices are written again (cold box).
source "$(dirname "$0")/lib.sh"
T0=$(date +%s)
B="--layers 8 --layers-b 4 --work /root/b397 --text .carry/shared/text/eval --no-progress --prefetch= --no-staged"
timeout 170 python3 benchmarks/bench_397b.py --phases write $B > $OUT/b397-write.log 2>&1; echo "write rc=$? $(( $(date +%s) - T0 )) s"
pack
timeout 300 python3 benchmarks/bench_397b.py --phases balloon $B --balloon-kind replay-direct-cpu8 > $OUT/b397-balloon.log 2>&1
echo "balloon rc=$? $(( $(date +%s) - T0 )) s"; cp /root/b397/state.json $OUT/state-balloon.json 2>/dev/null
grep -v '^{' $OUT/b397-balloon.log | tail -8
