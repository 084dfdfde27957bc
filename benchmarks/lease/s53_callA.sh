#!/usr/bin/env bash
# Session 53, call A (about 420 s): the embed test fixed (the tiny model's limit is 128 positions) with --embed auto
# beside gpu and host; then issue 12's offload runs (bf16, --vram-gb 4, replayed routing, one eval document) with
# the embedding table in pinned RAM: default, lru/device, lru+cpu/device, nextuse+cpu/device, nextuse+pf1/device (the
# demand and prefetch goals' runs), then the same runs with the table on the GPU while time is left.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 120 tests/test_embed_host.py
peers_ckpt; peers_layout layout source source; pack
RUNS="default,lru/device,lru+cpu/device,nextuse+cpu/device,nextuse+pf1/device"
TIMEOUT=170 offload_variant runs-host "$RUNS" --nextuse-prefetch 1 --embed host
[ $(( $(date +%s) - T0 )) -lt 250 ] && TIMEOUT=170 offload_variant runs-gpu "$RUNS" --nextuse-prefetch 1 --embed gpu
true
