#!/usr/bin/env bash
# Session 28, call A (cold box): llama.cpp's build in the background (with the peers checkpoint and its bf16 GGUF),
# the CUDA tests not run since session 27's call D (the scheduler's steps ahead, batch graphs with replay, prefill
# graphs, the align kernel, the grouped q4 kernels at <= 16 rows an expert), the peers layouts, then Q4_0 by
# llama-quantize and llama-batched-bench (64-token prompts, 64 new, B = 1, 8, 32, 128) on both GGUFs.
source "$(dirname "$0")/lib.sh"
llama_bg
cuda_tests 280 tests/test_scheduler_ahead.py tests/test_scheduler.py tests/test_batchgraph_replay.py \
  tests/test_engine.py tests/test_quant_grouped.py tests/test_moe_kernels.py \
  -k "cuda_ahead or prefill_graphs or cuda_graphed or cuda_batched or replay or grouped_quant_10b or align"
peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -3; echo "build done $(el)"; pack
llama_batched
