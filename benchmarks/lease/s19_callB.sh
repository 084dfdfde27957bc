#!/usr/bin/env bash
# Session 19, call B (warm box after A, its layouts): tests on the GPU: the attention kernel file (the split kernel's
# loads before the PDL wait) and the PDL decode, the word tile's pairs (QConfig.conv 2) and the preload in
# test_quant_kernels (unmarked tests run on CUDA when it is there), the device step's fill (--device-fill auto, the
# captured step); then the bf16 offload at --vram-gb 4 with replayed routing, the default and the fill auto (its
# table is full after the prefill: auto should cost next to nothing); the q4+q4 fill auto again, first in a fresh
# process (order effects).
source "$(dirname "$0")/lib.sh"
gpu_tests() {  # NAME TIMEOUT PYTEST-ARGS...: -> $OUT/tests-NAME.log, its summary printed
  local name=$1 t=$2; shift 2
  timeout $t python3 -m pytest -q -p no:cacheprovider --tb=short "$@" > $OUT/tests-$name.log 2>&1
  echo "rc=$?" >> $OUT/tests-$name.log
  grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/tests-$name.log | tail -8; echo "tests $name done $(el)"; pack
}
gpu_tests attn 120 tests/test_attention_kernel.py tests/test_pdl.py tests/test_attention_decode.py
gpu_tests quant 120 tests/test_quant_kernels.py -k "words or pairs or preload"
gpu_tests fill 150 -m cuda tests/test_devtable.py -k "fill or device_step_matches"
offload_variant default "default,lru+fillauto/device" --device-fill auto
TIMEOUT=150 LAYOUT=layout-q4 offload_variant fill2 "lru+fillauto/device,default" --device-fill auto
