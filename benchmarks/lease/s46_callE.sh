#!/usr/bin/env bash
# Session 46, call E (the last 300 s of the budget): the q/k norms, rotary and K/V store inside the decode attention's
# split kernel (decode_attention_qkv, TIERED_ATTN_ROPE=fused: no qk_rope launch a layer) against the qk_rope launch,
# VRAM decode of the 8-layer 10.6B shape, q4+q4 only (no bf16 repack: the time), alternating fresh processes; then
# the new kernel's CUDA tests.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
peers_vram q4 launch
peers_vram q4 fused TIERED_ATTN_ROPE=fused
peers_vram q4 launch2
peers_vram q4 fused2 TIERED_ATTN_ROPE=fused
pack
cuda_tests 60 tests/test_attention_kernel.py -k "qkv or graph"
