#!/usr/bin/env bash
# Session 47, call B: the captured step's two ends as PDL-aware Triton launches (kernels/step_io.py: the token's
# embedding row, the rotary rows and the length in one launch; the greedy pick and the position's advance in two)
# against torch's eight small ops (TIERED_STEP_IO=torch), the VRAM decode of the 8-layer 10.6B shape at bench_peers'
# capacity, q4+q4 alternating fresh processes twice, bf16 both ways once. Then a kernel profile of the q4 step
# (tools/profile_kernels.py, 16 tokens) and the CUDA tests of step_io and the graphed glue decode.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 kernel
peers_vram q4 torch TIERED_STEP_IO=torch
peers_vram q4 kernel2
peers_vram q4 torch2 TIERED_STEP_IO=torch
peers_vram bf16 kernel
peers_vram bf16 torch TIERED_STEP_IO=torch
decode_table
timeout 120 python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on > $OUT/profile-q4.log 2>&1
echo "profile rc=$? $(el)"; grep -E "launches|kernel time|^\s+_|step_|void" $OUT/profile-q4.log | cut -c1-130 | head -30
pack
cuda_tests 150 tests/test_step_io.py tests/test_fused_glue.py
