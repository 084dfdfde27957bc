#!/usr/bin/env bash
# Session 48, call A: the Gluon gate_up guessing its expert from the router's logits before its PDL wait
# (quant_gluon_moe._spec_expert; TIERED_SPEC_ROUTE=0 turns it off), the VRAM decode of the 8-layer 10.6B shape at
# bench_peers' capacity, q4+q4 alternating fresh processes twice, bf16 once. Then the CUDA tests of the guess (the
# kernel bit for bit with and without, the misses counted; the reference model's graphed decode with no miss), the
# engine's fused-kernel tests, and the replayed step's timeline by position (session 47's call F).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram q4 spec
peers_vram q4 off TIERED_SPEC_ROUTE=0
peers_vram q4 spec2
peers_vram q4 off2 TIERED_SPEC_ROUTE=0
peers_vram bf16 base
decode_table
cuda_tests 200 tests/test_quant_gluon_moe.py tests/test_step_io.py "tests/test_quant_kernels.py::test_cuda_engine_runs_the_fused_kernels"
timelines q4
