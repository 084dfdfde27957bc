#!/usr/bin/env bash
# Session 45, call B: the experts' gate_up and down on tensor cores in Gluon (tools/gluon_q4_experts_probe.py --gpu)
# at 1, 2 and 4 groups a step and 1, 2, 4 steps a load. Session 43's probe read gate_up's words 4 bytes a load: a
# select between the gate and up row pointers hid their alignment (now one base pointer, 8-byte loads at one group a
# step, 16-byte from two). Each variant checked against the dequantized reference, then timed in a CUDA graph of 8
# calls on other slots against TUNED's quant_gate_up / quant_down (no PDL on either side). Then the decode attention's
# CUDA tests (1bae381: the splits store only the query rows' partials, empty splits no acc).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
timeout 200 python3 tools/gluon_q4_experts_probe.py --gpu > $OUT/gluon-q4-experts.log 2>&1
echo "experts rc=$? $(el)"; grep -E '^(gate_up|down|emulated):? |rror' $OUT/gluon-q4-experts.log | grep -v '{' | cut -c1-900
grep -E 'rror' $OUT/gluon-q4-experts.log | head -5; pack
cuda_tests 150 tests/test_attention_kernel.py tests/test_attention_decode.py
