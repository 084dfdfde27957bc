#!/usr/bin/env bash
# Session 13, call D: the CUDA tests of the files this session touched or that hold page-locked host buffers (the
# RAM tier is now a private THP mapping with MADV_DONTFORK; the device probe takes medians; the slot table counts
# its copied bytes once): cache, CPU mailbox, device table, CPU experts, miss path, engine.
source "$(dirname "$0")/lib.sh"
cuda_tests 520 tests/test_cache.py tests/test_cpu_mailbox.py tests/test_devtable.py tests/test_cpu_experts.py \
  tests/test_miss_path.py tests/test_engine.py
