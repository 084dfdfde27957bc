#!/usr/bin/env bash
# Session 47, call A (prepared in session 46): the one-token step's paged-attention grid sized for 1,024 positions
# while the cache fits them (the default since e18b4ef: a second triton graph for the rest of max_context) against
# one grid sized for max_context (TIERED_SHORT_CAPACITY=0), the VRAM decode of the 8-layer 10.6B shape loaded at
# `tiered run`'s default capacity 4,096 (bench_peers' runs stay under 1,024 tokens), q4+q4 alternating fresh
# processes twice, bf16 both ways once; capture_s and graph memory from the stats. On an H200 also s45's call C
# (the Gluon gate_up default against the word tile). Then the CUDA tests of the attention.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
peers_vram_ctx 4096 q4 short
peers_vram_ctx 4096 q4 one TIERED_SHORT_CAPACITY=0
peers_vram_ctx 4096 q4 short2
peers_vram_ctx 4096 q4 one2 TIERED_SHORT_CAPACITY=0
peers_vram_ctx 4096 bf16 short
peers_vram_ctx 4096 bf16 one TIERED_SHORT_CAPACITY=0
peers_vram q4 at800
if echo "$GPU" | grep -q H200; then
  WORD="gate_up,q4,2048,768:bn=8,bg=16,warps=4,algo=2"
  peers_vram q4 tuned; peers_vram q4 word TIERED_QCONFIG="$WORD"; peers_vram bf16 base
fi
decode_table
pack
cuda_tests 150 tests/test_attention_decode.py tests/test_attention_kernel.py
