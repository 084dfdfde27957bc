#!/usr/bin/env bash
# Session 11, lease call G (written after the device was refused; for the next session, after call F): --h2d-gbps
# inside the device step (the gather kernel paces itself): the CUDA test of the paced gather, then the bf16 offload
# at 25 and 12 GB/s, lru/device against lru+cpu/device (issue 12's 1.5x at 12 GB/s, paced_device_cpu_over_off).
source "$(dirname "$0")/lib.sh"
cuda_tests 120 tests/test_devtable.py -k paced
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=300 offload_variant paced "lru/device@25,lru+cpu/device@25,lru/device@12,lru+cpu/device@12,lru/off@12,lru/auto@12" \
  --paced "25,12"
