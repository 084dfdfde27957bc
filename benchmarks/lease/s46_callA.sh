#!/usr/bin/env bash
# Session 46, call A: the decode attention's fused merge (the last split of each KV head merges the partials: no
# combine kernel; TIERED_ATTN_COMBINE=fused) against the combine kernel: the attention alone in graphs
# (bench_attention, B 1, contexts 528 / 784 / 4096 under an 800-position and a 4096-position capacity), then the
# VRAM decode of the 8-layer 10.6B shape, q4+q4 alternating fresh processes twice, bf16 both ways; then the CUDA
# tests of the attention kernel and the graphed decode with the fused merge.
# (Rewritten after the call onto lib.sh's helpers; the script as run is at the commit its results name.)
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
python3 benchmarks/bench_attention.py --contexts 528,784 --batches 1 --max-context 800 > $OUT/attn-800.log 2>&1
cp $OUT/attention.json $OUT/attention-800.json 2>/dev/null
python3 benchmarks/bench_attention.py --contexts 528,4096 --batches 1,8 --max-context 4096 > $OUT/attn-4096.log 2>&1
cp $OUT/attention.json $OUT/attention-4096.json 2>/dev/null
grep -A6 "splits" $OUT/attn-800.log $OUT/attn-4096.log | grep -v "^--$" | cut -c1-120; echo "attention $(el)"; pack
peers_layouts
peers_vram q4 launch
peers_vram q4 fused TIERED_ATTN_COMBINE=fused
peers_vram q4 launch2
peers_vram q4 fused2 TIERED_ATTN_COMBINE=fused
peers_vram bf16 launch
peers_vram bf16 fused TIERED_ATTN_COMBINE=fused
decode_table
pack
cuda_tests 200 tests/test_attention_kernel.py tests/test_fused_glue.py
