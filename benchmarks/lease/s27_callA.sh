#!/usr/bin/env bash
# Session 27, call A (cold box): the grouped q4 expert kernels at few rows an expert, alone on the GPU
# (bench_quant_kernels.py --phase prefill --swap-sweep: the picked tiles against the transposed products,
# GroupedConfig.swap 1-3, at T = 16 / 128 / 512 tokens, i.e. 1 / 8 / 32 rows an expert at the 10.6B shape),
# then the peers checkpoint and its q4+q4 and bf16 layouts for call B.
source "$(dirname "$0")/lib.sh"
timeout 260 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --tokens 16,128,512 \
  --shapes 10.6B,397B --swap-sweep --no-gemlite --max-seconds 240 > $OUT/kernels.log 2>&1
echo "kernels rc=$? $(el)"; grep -E "q4|bf16" $OUT/kernels.log | grep -v "^{" | cut -c1-150 | tail -70; pack
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
