#!/usr/bin/env bash
# Session 33, call A2 (A's warm box): repack's quantization on the GPU against the CPU (one expert role of the
# 10.6B shape and its lm_head, bench_repack_gpu.py), then the peers checkpoint and its whole q4+q4 repack on the GPU.
source "$(dirname "$0")/lib.sh"
timeout 200 python3 benchmarks/bench_repack_gpu.py --out $OUT/repack_parts.json > $OUT/repack_parts.log 2>&1
echo "parts rc=$? $(el)"; tail -3 $OUT/repack_parts.log | cut -c1-300; pack
peers_ckpt
timeout 250 python3 benchmarks/bench_repack_gpu.py --ckpt $W/ckpt --skip-parts --work /root/rp --out $OUT/repack_whole.json \
  > $OUT/repack_whole.log 2>&1
echo "whole rc=$? $(el)"; grep "whole repack" $OUT/repack_whole.log; pack
