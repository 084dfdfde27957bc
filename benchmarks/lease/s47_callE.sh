#!/usr/bin/env bash
# Session 47, call E: the batch graphs' ends as Triton launches (kernels/step_io.py rows_inputs: tokens' embeddings,
# rotary rows, lengths, block table and valid rows from the bucket's buffer in one launch; greedy_pick over the rows
# in two) against torch's ops (TIERED_STEP_IO=torch), bench_batch_gpu's VRAM phase on the q4+q4 layout at B = 1, 8,
# 32, own routing, one process each, alternating; then the single-sequence decode (q4, bf16) at HEAD for the
# session's final figures, and the CUDA tests of step_io, the scheduler and the glue.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
BATCH_TIMEOUT=80 batch_vram q4-kernel layout-q4 1,8,32 graphs
BATCH_TIMEOUT=80 batch_vram q4-torch layout-q4 1,8,32 graphs TIERED_STEP_IO=torch
BATCH_TIMEOUT=80 batch_vram q4-kernel2 layout-q4 1,8,32 graphs
BATCH_TIMEOUT=80 batch_vram q4-torch2 layout-q4 1,8,32 graphs TIERED_STEP_IO=torch
peers_vram q4 head
peers_vram bf16 head
decode_table
cuda_tests 200 tests/test_step_io.py tests/test_scheduler.py tests/test_fused_glue.py tests/test_sampling.py
