#!/usr/bin/env bash
# Session 50, call B (cold box): issue 13's same-run baseline at HEAD. llama.cpp (the peer) built here beside the
# checkpoint, its bf16 GGUF and tiered's two layouts (bf16; q4 experts + q4 dense); then Q4_0 by llama-quantize
# (bench_peers --phase model), and, alternating on the idle box, tiered's VRAM decode (q4+q4, bf16) and llama-bench
# tg128 / pp512 on the bf16 and Q4_0 GGUFs; bench_peers --phase report writes the ratios (q4_vs_llamacpp_q4_0,
# q4_vs_bf16_decode). The last same-run llama.cpp comparison was session 17's.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
baseline_same_run
