#!/usr/bin/env bash
# Session 48, call D: the Gluon gate_up under a register cap of 128 (QConfig.regs, through TIERED_QCONFIG: ptxas then
# issues a program's word loads in two rounds rather than four) against TUNED's uncapped tile, the VRAM decode of
# the 8-layer 10.6B shape, q4+q4 alternating fresh processes twice; then the CUDA tests of the one-sequence decode
# paths at HEAD (session 47's call F list) and of quant_gluon_moe.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
CAP="gate_up,q4,2048,768:bn=64,bg=4,warps=4,algo=3,ahead=2,regs=128"
peers_vram q4 cap128 TIERED_QCONFIG=$CAP
peers_vram q4 base
peers_vram q4 cap128b TIERED_QCONFIG=$CAP
peers_vram q4 base2
decode_table
cuda_tests 200 tests/test_quant_gluon_moe.py tests/test_capture.py tests/test_ahead.py tests/test_engine.py tests/test_attention_decode.py
