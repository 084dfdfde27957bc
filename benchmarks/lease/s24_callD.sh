#!/usr/bin/env bash
# Session 24, call D: the dense copy's effect on a whole model. q4+q4 10.6B 8-layer model in VRAM (bench_peers'
# tiered phase: prefill of a 512-token prompt, first and warm; decode), the default (a dense copy then cuBLAS from
# 256 rows) against TIERED_DEQUANT_ROWS=0 (the fused GEMM at every prefill size), alternating, fresh processes.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
for tag in dq1 fused1 dq2 fused2; do
  case $tag in fused*) k=0 ;; *) k= ;; esac
  peers_vram q4 $tag TIERED_DEQUANT_ROWS=$k
  grep -iE "prefill512" $OUT/peers-q4-$tag.log | grep -v '^{' | tail -1
done
