#!/usr/bin/env bash
# Session 10, lease call G: the CUDA tests of the device table and the engine after the review commit (one
# device-table check for the --device-* flags, the fill window's host-side arithmetic).
source "$(dirname "$0")/lib.sh"
timeout 250 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py tests/test_engine.py \
  tests/test_ahead.py > $OUT/cuda-tests-review.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests-review.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests-review.log | tail -8; echo "tests done $(el)"
