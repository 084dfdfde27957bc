#!/usr/bin/env bash
# Session 9, lease call B: the device step with greedy run-ahead (8093c2b, never run on the GPU before), measured:
# checkpoint and both repacks (alone, one after the other), then issue 13's q4 offload (lru/device, nextuse/device)
# and issue 12's bf16 offload (lru/device, nextuse/device) at --vram-gb 4 with replayed routing, each with a profile
# of one device-step run on the warm cache (bench_cpu_experts_gpu.py --profile: wall and kernels per token).
source "$(dirname "$0")/lib.sh"
peers_layouts
peers_offload layout-q4 "lru/device,nextuse/device" --profile lru/device
peers_offload layout "lru/device,nextuse/device" --profile nextuse/device
