#!/usr/bin/env bash
# Session 51, call B (after call A on the same warm box, whose checkpoint and layouts it reuses; on a cold box it
# makes them beside the build): issue 13's same-run llama.cpp baseline at HEAD on whatever card call A got.
# llama.cpp built here, its bf16 GGUF, Q4_0 by llama-quantize (bench_peers --phase model); tiered's VRAM decode
# (q4+q4, bf16) before and after llama-bench tg128 / pp512 on the bf16 and Q4_0 GGUFs; bench_peers --phase report
# writes the ratios (q4_vs_llamacpp_q4_0, q4_vs_bf16_decode).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
baseline_same_run
