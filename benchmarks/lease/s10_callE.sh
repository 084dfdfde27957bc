#!/usr/bin/env bash
# Session 10, lease call E: the CUDA tests of the files this session's code touches (the device table's hand-over,
# the fill, the engine's options), at the final code.
source "$(dirname "$0")/lib.sh"
timeout 330 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short --durations=8 tests/test_devtable.py \
  tests/test_ahead.py tests/test_cache.py tests/test_engine.py tests/test_cpu_experts.py \
  > $OUT/cuda-tests-final.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests-final.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests-final.log | tail -10; echo "tests done $(el)"
