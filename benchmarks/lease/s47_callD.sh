#!/usr/bin/env bash
# Session 47, call D: the Gluon gate_up asking L2 for each program's rows in bulk once its slot is read
# (TIERED_L2_BULK=1: six cp.async.bulk.prefetch.L2 a program) against the default (loads one step ahead), the VRAM
# decode of the 8-layer 10.6B shape, q4+q4 alternating fresh processes twice, bf16 once; the timeline of the q4 step
# with it on (what gate_up adds to the token: 72.9 us in call C); the CUDA tests of quant_gluon_moe.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 off
peers_vram q4 bulk TIERED_L2_BULK=1
peers_vram q4 off2
peers_vram q4 bulk2 TIERED_L2_BULK=1
peers_vram bf16 base
decode_table
TIERED_L2_BULK=1 timeout 150 python3 tools/profile_kernels.py -m $W/layout-q4 --tokens 16 --glue on --timeline \
  > $OUT/timeline-q4-bulk.log 2>&1
echo "timeline rc=$? $(el)"; grep -A14 "replayed" $OUT/timeline-q4-bulk.log | cut -c1-110; pack
cuda_tests 200 tests/test_quant_gluon_moe.py
