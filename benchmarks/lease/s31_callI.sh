#!/usr/bin/env bash
# Session 31, call I (cold box): the CUDA tests again at the final kernels' commit (mxfp4's cut-over at 4 tokens, the
# 128 x 64 tiles of q4 and mxfp4 above 96 rows an expert): the grouped quantized kernels' file, gpt-oss's engine, the
# bf16 grouped kernels, and the tile compile of every runtime pick for sm_90.
source "$(dirname "$0")/lib.sh"
cuda_tests 300 tests/test_gpt_oss.py tests/test_quant_grouped.py tests/test_moe_kernels.py -k "cuda or gpt_oss"
