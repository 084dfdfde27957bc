#!/usr/bin/env bash
# Session 9, lease call E: the CUDA tests call A's second half did not reach before its time limit (it ran in file
# order and stopped inside test_quant_grouped.py after 57 passed): the last two cases of that file and every CUDA
# test of the files after it.
source "$(dirname "$0")/lib.sh"
timeout 220 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short --durations=8 \
  "tests/test_quant_grouped.py::test_cuda_engine_prefill_takes_the_grouped_kernels" tests/test_resident_verify.py \
  tests/test_scheduler.py tests/test_segmented_decode.py tests/test_write_random_layout.py \
  > $OUT/cuda-tests-tail.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests-tail.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests-tail.log | tail -8; echo "done $(el)"
