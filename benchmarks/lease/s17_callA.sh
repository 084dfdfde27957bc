#!/usr/bin/env bash
# Session 17, call A (cold box): the CUDA tests of the q4 kernels (the dense GEMV and the expert down kernel now load
# what the previous kernel does not write before their PDL wait: QConfig-independent `PRE`), of the fused glue and
# of the engine's graphs; then the peers checkpoint and its q4+q4 and bf16 repacks for call B.
source "$(dirname "$0")/lib.sh"
cuda_tests 240 tests/test_quant_kernels.py tests/test_fused_glue.py tests/test_engine.py
peers_layouts
