#!/usr/bin/env bash
# Session 54, call A (about 180 s after the start: what the budget leaves): the predicted eviction with CPU experts
# (nextuse+cpu/device, the demand goal's --policy predicted run; the simulator at this card's figures puts it 2 points
# above lru+cpu) beside the default, five eval documents, then the CUDA tests of the graph-pool fix (6e60d37:
# graph_mem_bytes from capture.pool_bytes; test_attention_decode's capture test failed on -14 MB in session 54).
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=150 offload_variant nextuse "default,nextuse+cpu/device" --docs 5
cuda_tests 120 tests/test_attention_decode.py tests/test_capture.py -k "graphs_captured_at_load or pool"
true
