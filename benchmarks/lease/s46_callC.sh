#!/usr/bin/env bash
# Session 46, call C: the decode attention's combine reading only the splits that hold keys (masked loads, no loop;
# call B's chunked loop lost at long contexts; empty splits store nothing) against the kernel before it (044bb2c's
# attention.py, carried in .carry/old), which read every split of a grid sized for max_context. The attention alone
# (bench_attention, B 1 and 8, under an 800- and a 4096-position capacity), then the VRAM decode of the 8-layer
# 10.6B shape, q4+q4, alternating fresh processes: at bench_peers' capacity (800) and at `tiered run`'s default
# 4096; then the attention's CUDA tests.
# (Rewritten after the call onto lib.sh's helpers; the script as run is at the commit its results name.)
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
attn_ab_prelude new 044bb2c
attn_ab_decodes 044bb2c
decode_table; pack
cuda_tests 100 tests/test_attention_kernel.py
