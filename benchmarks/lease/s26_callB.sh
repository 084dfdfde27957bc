#!/usr/bin/env bash
# Session 26, call B (warm box, after A): Q4_0 by llama-quantize (bench_peers --phase model), then llama.cpp's
# baselines for this session's goals on the same box: llama-bench pp512 / pp4000 / tg128 on the bf16 and Q4_0
# GGUFs, and llama-batched-bench (64-token prompts, 64 new tokens, B = 1, 8, 32, 128, all on the GPU) on both.
source "$(dirname "$0")/lib.sh"
timeout 200 python3 benchmarks/bench_peers.py --phase model --work $W --llama-bin /root/lb/bin > $OUT/model.log 2>&1
echo "model rc=$? $(el)"; tail -3 $OUT/model.log; cp $W/model.json $OUT/ 2>/dev/null; pack
for q in bf16 q4_0; do
  timeout 150 /root/lb/bin/llama-bench -m $W/model-$q.gguf -ngl 99 -p 512,4000 -n 128 -r 3 -o jsonl \
    > $OUT/llama-bench-$q.jsonl 2> $OUT/llama-bench-$q.err
  echo "llama-bench $q rc=$? $(el)"; grep -o '"n_prompt": [0-9]*, "n_gen": [0-9]*\|"avg_ts": [0-9.]*' $OUT/llama-bench-$q.jsonl | paste - - ; pack
  timeout 200 /root/lb/bin/llama-batched-bench -m $W/model-$q.gguf -ngl 99 -c 18432 -b 2048 -ub 512 -npp 64 -ntg 64 \
    -npl 1,8,32,128 --output-format jsonl > $OUT/llama-batched-$q.jsonl 2> $OUT/llama-batched-$q.err
  echo "batched $q rc=$? $(el)"; grep -o '"pl": [0-9]*\|"speed_tg": [0-9.]*' $OUT/llama-batched-$q.jsonl | paste - - ; pack
done
