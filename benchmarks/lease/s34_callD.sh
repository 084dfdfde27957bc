#!/usr/bin/env bash
# Session 34, call D, the final rule (the dense copy + cuBLAS from 128 rows where it is one slice, from 257 for the
# lm_head): the CUDA tests of qlinear's rows and of the copy; the 8-layer 10.6B in VRAM, q4+q4 and bf16 (512-token
# prefill, decode: issue 13's q4/bf16 at HEAD); batches of 128 rows (their qkv and o_proj now take the copy) against
# TIERED_DEQUANT_ROWS=257 (call C's rule, the fused GEMM at 128 rows).
source "$(dirname "$0")/lib.sh"
cuda_tests 70 tests/test_quant_dequant.py "tests/test_quant_grouped.py::test_cuda_qlinear_prefill_rows"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
peers_vram q4 final
grep -iE "prefill512" $OUT/peers-q4-final.log | grep -v '^{' | tail -1
peers_vram bf16 final
grep -iE "prefill512" $OUT/peers-bf16-final.log | grep -v '^{' | tail -1
BATCH_TIMEOUT=75 batch_vram q4-rows128 layout-q4 32,128 graphs
BATCH_TIMEOUT=75 batch_vram q4-rows257 layout-q4 32,128 graphs TIERED_DEQUANT_ROWS=257
