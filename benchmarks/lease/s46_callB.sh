#!/usr/bin/env bash
# Session 46, call B: the decode attention's combine reading only the splits that hold keys (chunks of 16, merged
# online; empty splits store nothing) against the kernel before it (044bb2c's attention.py, carried in .carry/old),
# which read every split of a grid sized for max_context. The attention alone (bench_attention, B 1 and 8, under an
# 800- and a 4096-position capacity), then the VRAM decode of the 8-layer 10.6B shape, q4+q4, alternating fresh
# processes: at bench_peers' capacity (800) and at `tiered run`'s default 4096; bf16 at both; then the CUDA tests of
# the attention kernel and the graphed decodes.
# (Rewritten after the call onto lib.sh's helpers; the script as run is at the commit its results name.)
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
attn_ab_prelude new 044bb2c
attn_ab_decodes 044bb2c
peers_vram bf16 new
peers_vram_ctx 4096 bf16 new4k
swap_in $AT 044bb2c; peers_vram_ctx 4096 bf16 old4k; swap_in $AT new
decode_table; pack
cuda_tests 150 tests/test_attention_kernel.py tests/test_fused_glue.py
