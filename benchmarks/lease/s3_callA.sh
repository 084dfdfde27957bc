#!/usr/bin/env bash
# Session 3 (2026-11-30 night), lease call A: the UVA gather probe (can a kernel copy expert blocks out of pinned
# host memory, at what GB/s, next to the copy engine), the CUDA test suite, and the families benchmark.
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
timeout 90 python3 benchmarks/probe_uva_copy.py > $OUT/uva.log 2>&1; echo "uva rc=$?"; grep -v '^{"bench' $OUT/uva.log | tail -20
pack
(PYTHONPATH=/tmp/site timeout 420 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
PYTHONPATH=/tmp/site timeout 420 python3 benchmarks/bench_families_gpu.py --work /root/fam > $OUT/families.log 2>&1; echo "families rc=$?"
pack
wait
grep -v '^{' $OUT/families.log | tail -30; tail -25 $OUT/cuda-tests.log
