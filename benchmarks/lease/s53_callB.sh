#!/usr/bin/env bash
# Session 53, call B (about 450 s, on call A's warm box): --embed auto made the default. The CUDA tests of the files
# whose tests run untied tiny models under expert budgets (their tables now go to pinned RAM where the experts do
# not all fit), then issue 12's offload on all five eval documents: default, lru/device and nextuse+pf1/device with
# the default (auto: the table in pinned RAM at --vram-gb 4) and with --embed gpu.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 200 tests/test_embed_host.py tests/test_cache.py tests/test_cpu_experts.py tests/test_cpu_mailbox.py \
  tests/test_devtable.py tests/test_engine.py tests/test_miss_path.py tests/test_segmented_decode.py \
  tests/test_scheduler.py
peers_ckpt; peers_layout layout source source; pack
RUNS="default,lru/device,nextuse+pf1/device"
TIMEOUT=110 offload_variant docs5-auto "$RUNS" --nextuse-prefetch 1 --docs 5
[ $(( $(date +%s) - T0 )) -lt 330 ] && TIMEOUT=110 offload_variant docs5-gpu "$RUNS" --nextuse-prefetch 1 --docs 5 --embed gpu
true
