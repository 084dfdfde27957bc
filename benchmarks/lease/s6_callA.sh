#!/usr/bin/env bash
# Session 6, lease call A: the 397B slices in the target's --io direct mode, with and without CPU experts
# (--cpu-experts auto on 8 of this box's cores: the emulated target CPU), K = 10 on slices A and B (calibration),
# then K = 4, then K = 10 on 16 cores (sensitivity). The q4 CPU-expert rate at the 397B shape per thread count
# first; the CUDA tests of the CPU-expert path beside the writer (nothing timed runs beside them).
source "$(dirname "$0")/lib.sh"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
B="--layers 8 --layers-b 4 --work /root/b397 --text .carry/shared/text/eval --no-progress --prefetch= --no-staged"
(timeout 140 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_experts.py > $OUT/cuda-tests.log 2>&1
 echo "rc=$?" >> $OUT/cuda-tests.log) &
timeout 160 python3 benchmarks/bench_397b.py --phases write $B > $OUT/b397-write.log 2>&1; echo "write rc=$? $(el) s"
wait
tail -4 $OUT/cuda-tests.log
timeout 60 python3 tools/bench_cpu_experts.py --hidden 4096 --ffn 1024 --k 10 --threads 16,8,4 --paths q4 --pool-gb 4 \
  --links 25 > $OUT/cpu-rate.log 2>&1; echo "cpu-rate rc=$? $(el) s"; grep -v '^{' $OUT/cpu-rate.log | tail -12
pack
K="replay-direct,replay-direct-cpu8"
timeout $(( 560 - $(el) )) python3 benchmarks/bench_397b.py --phases slice $B --ks 10 --extra-kinds $K --only-kinds $K \
  > $OUT/b397-slice10.log 2>&1; echo "slice k10 rc=$? $(el) s"; grep -E "tok/s|slice" $OUT/b397-slice10.log | tail -8
cp /root/b397/state.json $OUT/state.json; pack
timeout $(( 560 - $(el) )) python3 benchmarks/bench_397b.py --phases slice $B --ks 4 --extra-kinds $K --only-kinds $K \
  > $OUT/b397-slice4.log 2>&1; echo "slice k4 rc=$? $(el) s"; grep -E "tok/s|slice" $OUT/b397-slice4.log | tail -8
cp /root/b397/state.json $OUT/state.json; pack
K16="replay-direct-cpu16"
timeout $(( 580 - $(el) )) python3 benchmarks/bench_397b.py --phases slice $B --ks 10 --extra-kinds $K16 --only-kinds $K16 \
  > $OUT/b397-slice16.log 2>&1; echo "slice cpu16 rc=$? $(el) s"; grep -E "tok/s|slice" $OUT/b397-slice16.log | tail -6
cp /root/b397/state.json $OUT/state.json
