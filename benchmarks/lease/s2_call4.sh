#!/usr/bin/env bash
# Lease call 4: the 397B slice runs call 3 left (resumed), the slice with RAM made scarce (mlock balloon, --io direct) and the projection.
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }  # after each step: a kill keeps the last
trap pack EXIT
PYTHONPATH=/tmp/site:$PWD timeout 500 python3 benchmarks/bench_397b.py --phases slice,balloon,project --layers 8 --layers-b 4 --work /root/b397 \
  --text .carry/shared/text/eval --no-progress > $OUT/b397b.log 2>&1; echo "397b rc=$?"; grep -v '^{' $OUT/b397b.log | tail -40
