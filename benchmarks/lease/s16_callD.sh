#!/usr/bin/env bash
# Session 16, call D (warm box after calls A-C, its layouts): the offload runs of issue 12 with the gemv router and
# call A's down tiles: bf16 at --vram-gb 4 with replayed routing, every option at its default against lru/device,
# then q4+q4 the same way; fresh processes (bench_cpu_experts_gpu.py, as session 14's call C2, without llama.cpp).
source "$(dirname "$0")/lib.sh"
offload_variant default "default,lru/device"
LAYOUT=layout-q4 offload_variant default "default,lru/device"
