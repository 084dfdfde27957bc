#!/usr/bin/env bash
# Session 48, call C: the word tile's eight strided x loads of a step issued together right after the PDL wait
# (kernels/quant_moe._dot_rows_words; before, each load sat at its use, behind the previous one's layout conversion
# through shared memory, and ptxas issues no load past a barrier: eight L2 round trips one after another in the
# dense GEMVs' post-wait path), against the previous quant_moe.py (.carry/old/quant_moe_base.py, swapped in), the
# VRAM decode of the 8-layer 10.6B shape, q4+q4 alternating fresh processes twice, bf16 once; then the CUDA tests of
# the quantized kernels and the timeline of the replayed q4 step.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
keep_new tiered/kernels/quant_moe.py
peers_vram q4 hoist
swap_in tiered/kernels/quant_moe.py base; peers_vram q4 base; swap_in tiered/kernels/quant_moe.py new
peers_vram q4 hoist2
swap_in tiered/kernels/quant_moe.py base; peers_vram q4 base2; swap_in tiered/kernels/quant_moe.py new
peers_vram bf16 hoist
decode_table
timelines q4
cuda_tests 240 tests/test_quant_kernels.py tests/test_quant_gluon_moe.py
