#!/usr/bin/env bash
# Session 4, lease call D: the 397B slices with this session's miss path (benchmarks/bench_397b.py), the CUDA tests
# of the merged miss path / device table / DeltaNet step beside the slice writer (nothing timed runs beside them),
# the projection, the GPU miss-path profile (register vs copy mode), then the balloon run (model larger than RAM).
source "$(dirname "$0")/lib.sh"
T0=$(date +%s)
B="--layers 8 --layers-b 4 --work /root/b397 --text .carry/shared/text/eval --no-progress"
(timeout 120 python3 -m pytest -v -m cuda -p no:cacheprovider --tb=short tests/test_miss_path.py tests/test_deltanet_step.py \
   tests/test_devtable.py > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
timeout 150 python3 benchmarks/bench_397b.py --phases write $B > $OUT/b397-write.log 2>&1; echo "write rc=$? $(( $(date +%s) - T0 )) s"
wait
grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | grep -v PASSED | tail -12; grep -c PASSED $OUT/cuda-tests.log
pack
timeout 230 python3 benchmarks/bench_397b.py --phases slice,project $B > $OUT/b397-slice.log 2>&1; echo "slice rc=$? $(( $(date +%s) - T0 )) s"
cp /root/b397/*.json $OUT/ 2>/dev/null; grep -v '^{' $OUT/b397-slice.log | tail -25
pack
timeout 50 python3 benchmarks/profile_miss_path.py --layout /root/b397/B --device cuda --only misses,cache_cpu > $OUT/miss-profile.log 2>&1
echo "profile rc=$? $(( $(date +%s) - T0 )) s"; grep -v '^{' $OUT/miss-profile.log | tail -14
pack
timeout 90 python3 benchmarks/bench_397b.py --phases balloon,project $B > $OUT/b397-balloon.log 2>&1; echo "balloon rc=$? $(( $(date +%s) - T0 )) s"
cp /root/b397/*.json $OUT/ 2>/dev/null; grep -v '^{' $OUT/b397-balloon.log | tail -15
