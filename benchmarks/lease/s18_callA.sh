#!/usr/bin/env bash
# Session 18, call A (cold box): the CUDA tests of the device step's fill (--device-fill auto: its first steps timed
# with CUDA events, then N from the link's rate), the peers layouts, then the q4+q4 offload at --vram-gb 4 with
# replayed routing: every option at its default (the fill off), demand paging, the fill auto, 8 and 6.
source "$(dirname "$0")/lib.sh"
cuda_tests 200 tests/test_devtable.py -k "fill or device_step_matches"
peers_layouts
TIMEOUT=330 LAYOUT=layout-q4 offload_variant fill \
  "default,lru/device,lru+fillauto/device,lru+fill8/device,lru+fill6/device" --device-fill auto,8,6
