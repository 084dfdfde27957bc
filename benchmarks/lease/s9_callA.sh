#!/usr/bin/env bash
# Session 9, lease call A: the CUDA tests alone on a fresh box (session 8's lesson), the files session 8 changed
# first (PDL, the device step's run-ahead, the expert kernels' slot_base/round_to), then every other CUDA test.
source "$(dirname "$0")/lib.sh"
FIRST="tests/test_pdl.py tests/test_devtable.py tests/test_ahead.py tests/test_moe_kernels.py
 tests/test_quant_kernels.py tests/test_cache.py tests/test_fused_glue.py tests/test_attention_decode.py"
timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short --durations=12 $FIRST \
  > $OUT/cuda-tests-first.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests-first.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests-first.log | tail -14; echo "first done $(el)"; pack
REST=$(ls tests/test_*.py | grep -v -E "$(echo $FIRST | tr ' ' '|')")
timeout 230 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short --durations=12 $REST \
  > $OUT/cuda-tests-rest.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests-rest.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests-rest.log | tail -14; echo "rest done $(el)"
