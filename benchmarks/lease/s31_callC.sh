#!/usr/bin/env bash
# Session 31, call C (the warm box of calls A and B): batches of gpt-oss. bench_batch_gpu.py's VRAM phase (own
# routing, 64-token prompts, 64 new tokens, B = 1, 8, 32) on call A's mxfp4+q8 and q4+q4 layouts (rows past
# decode_max_t: the grouped kernels with gpt-oss's biases), against llama-batched-bench on the MXFP4_MOE and Q4_0
# GGUFs of call B.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
for q in MXFP4_MOE Q4_0; do
  timeout 100 /root/lb/bin/llama-batched-bench -m $G/model-$q.gguf -ngl 99 -c 8192 -b 2048 -ub 512 -npp 64 \
    -ntg 64 -npl 1,8,32 --output-format jsonl > $OUT/llama-batched-$q.jsonl 2> $OUT/llama-batched-$q.err
  echo "batched $q rc=$? $(el)"; grep -o '"pl": [0-9]*\|"speed_tg": [0-9.]*\|"speed_pp": [0-9.]*' $OUT/llama-batched-$q.jsonl | paste - - -
  pack
done
for lay in mxfp4+q8 q4+q4; do
  rm -f /root/bb-$lay/batch_gpu.json
  timeout 150 python3 benchmarks/bench_batch_gpu.py --layout $G/layout-$lay --work /root/bb-$lay --phases vram \
    --batches 1,8,32 --paths graphs --routing own --text .carry/shared/text > $OUT/batch-$lay.log 2>&1
  echo "batch $lay rc=$? $(el)"; grep -E "tok/s" $OUT/batch-$lay.log | cut -c1-200 | tail -5
  cp /root/bb-$lay/batch_gpu.json $OUT/batch-$lay.json 2>/dev/null; pack
done
