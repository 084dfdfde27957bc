#!/usr/bin/env bash
# Session 53, call F (for the next lease, after s53_callE; about 450 s): with --embed auto the default, an untied
# model under an expert budget now keeps its embedding table in pinned RAM on every path, the batch steps included
# (step_io.rows_inputs over UVA). Session 53's call B ran the CUDA tests of test_cache, test_cpu_experts,
# test_cpu_mailbox, test_devtable, test_engine, test_embed_host, test_miss_path, test_segmented_decode and
# test_scheduler (51 passed); these are the other CUDA test files that load models under budgets.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 430 tests/test_batch_hybrid.py tests/test_batchgraph_replay.py tests/test_attention_decode.py \
  tests/test_pdl.py tests/test_moe_kernels_model.py tests/test_gpt_oss.py tests/test_deepseek_v3.py \
  tests/test_quant_layout.py tests/test_write_random_layout.py tests/test_quant_kernels.py
true
