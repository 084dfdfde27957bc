#!/usr/bin/env bash
# Session 4, lease call B (right after A, on the warm box with /root/lb built): Qwen3.5-MoE of the 35B-A3B shape cut to
# 8 layers, decode in VRAM: tiered against transformers (with fla) and llama.cpp (bf16 GGUF of the same weights,
# llama-bench tg64 -ngl 99 -fa 1), alone on the GPU.
source "$(dirname "$0")/lib.sh"
rm -rf /root/fam
T0=$(date +%s)
timeout 500 python3 benchmarks/bench_qwen35_gpu.py --part decode --work /root/q35 --llama-bin /root/lb/bin > $OUT/qwen35-decode.log 2>&1; echo "qwen35 rc=$?"
grep -v '^{' $OUT/qwen35-decode.log | tail -30; cp /root/q35/*.log $OUT/ 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
