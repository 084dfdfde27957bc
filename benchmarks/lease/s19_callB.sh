#!/usr/bin/env bash
# Session 19, call B (warm box after A, its layouts): the CUDA tests of the fill (captured step under auto) and of the
# word tile's pairs (QConfig.conv 2) against the reference; the bf16 offload at --vram-gb 4 with replayed routing, the
# default and the fill auto (its table is full after the prefill: auto should cost next to nothing); the q4+q4 fill
# auto again, first in a fresh process (order effects).
source "$(dirname "$0")/lib.sh"
cuda_tests 220 tests/test_devtable.py tests/test_quant_kernels.py -k "fill or device_step_matches or words or pairs or experts_match"
offload_variant default "default,lru+fillauto/device" --device-fill auto
TIMEOUT=150 LAYOUT=layout-q4 offload_variant fill2 "lru+fillauto/device,default" --device-fill auto
