#!/usr/bin/env bash
# Session 34, call E: gpt-oss's prompts (the gpt-oss-20b widths cut to 4 layers, random weights, in VRAM; 512 and
# 2,048 tokens from CUDA graphs) with the dense copy + cuBLAS from 128 / 257 rows (the default now) against
# TIERED_DEQUANT_ROWS=2048 (the old threshold: the fused GEMM at 512 rows; at 2,048 both take the new copy kernel),
# mxfp4 experts + q8 dense (gpt-oss's own format) and q4 + q4; fresh processes on one checkpoint.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
for ex in mxfp4+q8 q4+q4; do
  for rows in default 2048; do
    tag=$ex-$rows
    if [ $rows = default ]; then unset TIERED_DEQUANT_ROWS; else export TIERED_DEQUANT_ROWS=$rows; fi
    timeout 110 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts $ex --tiles "" --no-torch \
      --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss-$tag.log 2>&1
    echo "gptoss $tag rc=$? $(el)"; grep -v '^{' $OUT/gptoss-$tag.log | grep -iE "prefill of" | tail -2 | cut -c1-110
    cp $OUT/gpt_oss_gpu.json $OUT/gptoss-$tag.json 2>/dev/null; pack
  done
done
unset TIERED_DEQUANT_ROWS
