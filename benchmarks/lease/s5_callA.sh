#!/usr/bin/env bash
# Session 5, lease call A: the 397B phases not yet measured on the GPU, each with its own time share: the balloon
# (model larger than RAM: mlock the laptop's missing RAM in a separate process, O_DIRECT raw GB/s against the
# slice's disk GB/s in the same run) and the batch phase (aggregate tok/s at 8 and 32 rows, slice B). The state is
# seeded from the previous call's JSON (its slice runs feed the projection); the slices are written again here.
# CUDA tests of files the last suite run did not reach run beside the writer (nothing timed runs beside them).
source "$(dirname "$0")/lib.sh"
T0=$(date +%s)
B="--layers 8 --layers-b 4 --work /root/b397 --text .carry/shared/text/eval --no-progress --resume-from benchmarks/results/397b-2026-12-01-h200.json"
(timeout 110 python3 -m pytest -v -m cuda -p no:cacheprovider --tb=short tests/test_segmented_decode.py tests/test_scheduler.py \
   tests/test_resident_verify.py tests/test_write_random_layout.py tests/test_attention_decode.py > $OUT/cuda-tests.log 2>&1
 echo "rc=$?" >> $OUT/cuda-tests.log) &
timeout 150 python3 benchmarks/bench_397b.py --phases write $B > $OUT/b397-write.log 2>&1; echo "write rc=$? $(( $(date +%s) - T0 )) s"
wait
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -12; grep -c PASSED $OUT/cuda-tests.log
pack
timeout 230 python3 benchmarks/bench_397b.py --phases balloon $B > $OUT/b397-balloon.log 2>&1; echo "balloon rc=$? $(( $(date +%s) - T0 )) s"
cp /root/b397/state.json $OUT/state-balloon.json 2>/dev/null; grep -v '^{' $OUT/b397-balloon.log | tail -12
pack
timeout $(( 560 - ($(date +%s) - T0) )) python3 benchmarks/bench_397b.py --phases batch,project $B > $OUT/b397-batch.log 2>&1
echo "batch rc=$? $(( $(date +%s) - T0 )) s"; cp /root/b397/state.json $OUT/state.json 2>/dev/null; grep -v '^{' $OUT/b397-batch.log | tail -30
