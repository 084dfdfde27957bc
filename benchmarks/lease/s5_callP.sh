#!/usr/bin/env bash
# Session 5, lease call P: the 397B slices with history prefetch one layer ahead (kinds replay-pf2 and replay-pf4,
# K = 10), the other runs' figures seeded from the s5A JSON (the slices are written again on this fresh box); then
# the projection, which simulates the same predictor (fitted on fit/ routing) in calibration and at 60 layers, both
# with the registered page cache (mmap) and the --io direct host terms of s5A's balloon run.
source "$(dirname "$0")/lib.sh"
T0=$(date +%s)
B="--layers 8 --layers-b 4 --work /root/b397 --text .carry/shared/text/eval --no-progress --resume-from benchmarks/results/397b-2026-12-01-h200-s5A.json"
timeout 150 python3 benchmarks/bench_397b.py --phases write $B > $OUT/b397-write.log 2>&1; echo "write rc=$? $(( $(date +%s) - T0 )) s"
pack
timeout 150 python3 benchmarks/bench_397b.py --phases slice $B --ks 10 --prefetch 2,4 --only-kinds replay-pf2,replay-pf4 > $OUT/b397-pf.log 2>&1
echo "pf rc=$? $(( $(date +%s) - T0 )) s"; cp /root/b397/state.json $OUT/state-pf.json 2>/dev/null; grep -v '^{' $OUT/b397-pf.log | grep "tok/s" | tail -8
pack
timeout $(( 330 - ($(date +%s) - T0) )) python3 benchmarks/bench_397b.py --phases project $B --prefetch 2,4 > $OUT/b397-project.log 2>&1
echo "project rc=$? $(( $(date +%s) - T0 )) s"; cp /root/b397/state.json $OUT/state.json 2>/dev/null
grep -v '^{' $OUT/b397-project.log | grep -E "^project|^projected|calibration" | tail -30
