#!/usr/bin/env bash
# Session 26, call A (cold box; B and C follow on the warm box): llama.cpp builds in the background with the bf16
# GGUF of the peers checkpoint, the box makes the q4+q4 and bf16 layouts, then the CUDA tests of the batch step's
# new paths (the model's own expert path when every expert is resident, the Triton paged decode kernel, the
# decode-only steps replayed from CUDA graphs) beside the build.
source "$(dirname "$0")/lib.sh"
llama_bg
peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
cuda_tests 300 tests/test_scheduler.py tests/test_attention_kernel.py tests/test_batch_hybrid.py tests/test_batch.py
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -3; echo "build done $(el)"; sync; pack
