#!/usr/bin/env bash
# Session 12, lease call I: a miss split by FFN rows between the CPU and the link (--cpu-split auto: the CPU computes
# the first rows of one miss a layer, the gather copies the rest into the split row). CUDA tests of the mailbox (a
# forced row split among them), then the bf16 offload at --vram-gb 4 with replayed routing in one run: demand
# (lru, nextuse), CPU experts with the split and whole only (:whole = --cpu-split off), device prefetch (the prefetch
# goal's runs), and paced to 12 GB/s.
source "$(dirname "$0")/lib.sh"
cuda_tests 150 tests/test_cpu_mailbox.py
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=400 offload_variant i \
  "lru/device,nextuse/device,lru+cpu/device,lru+cpu:whole/device,nextuse+cpu/device,nextuse+cpu:whole/device,lru+pf8/device,nextuse+pf1/device,lru/device@12,lru+cpu/device@12" \
  --paced "12"
