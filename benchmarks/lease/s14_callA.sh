#!/usr/bin/env bash
# Session 14, call A: --cpu-split admit without the stall. The admitted split's slot is now reserved (neither found
# nor evicted) while its CPU rows are copied on a side stream, forked before the CPU wait, and enters the table at
# the step's end: no layer's lookup waits for the later copy (session 13 call A: it did, 0.97x / 0.93x). CUDA tests
# of the mailbox (an admitted split among them), then bf16 at --vram-gb 4 with replayed routing, whole experts and
# the admitted split in the same fresh process, twice per policy; then the host path's CPU experts at the native
# link (lru/auto against lru/off, both in one process): evidence for the --cpu-experts default.
source "$(dirname "$0")/lib.sh"
cuda_tests 150 tests/test_cpu_mailbox.py
peers_ckpt; peers_layout layout source source; pack
for i in 1 2; do
  offload_variant lru$i "lru+cpu/device,lru+cpu:admit/device"
  offload_variant nu$i "nextuse+cpu/device,nextuse+cpu:admit/device"
done
offload_variant host "lru/auto,lru/device,lru+cpu/device"
