#!/usr/bin/env bash
# Session 27, call F (last): llama.cpp's same-lease baselines for calls C and E: the build (alone, beside the bf16
# GGUF's conversion), Q4_0 by llama-quantize, llama-batched-bench (64-token prompts, 64 new tokens, B = 1, 8, 32,
# 128, all on the GPU) and llama-bench pp512 / tg128, on both GGUFs.
source "$(dirname "$0")/lib.sh"
llama_bg
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log | tail -3; echo "build done $(el)"; pack
timeout 150 python3 benchmarks/bench_peers.py --phase model --work $W --llama-bin /root/lb/bin > $OUT/model.log 2>&1
echo "model rc=$? $(el)"; tail -3 $OUT/model.log; cp $W/model.json $OUT/ 2>/dev/null; pack
for q in q4_0 bf16; do
  timeout 100 /root/lb/bin/llama-batched-bench -m $W/model-$q.gguf -ngl 99 -c 18432 -b 2048 -ub 512 -npp 64 -ntg 64 \
    -npl 1,8,32,128 --output-format jsonl > $OUT/llama-batched-$q.jsonl 2> $OUT/llama-batched-$q.err
  echo "batched $q rc=$? $(el)"; grep -o '"pl": [0-9]*\|"speed_tg": [0-9.]*' $OUT/llama-batched-$q.jsonl | paste - - ; pack
  timeout 60 /root/lb/bin/llama-bench -m $W/model-$q.gguf -ngl 99 -p 512 -n 128 -r 2 -o jsonl \
    > $OUT/llama-bench-$q.jsonl 2> $OUT/llama-bench-$q.err
  echo "llama-bench $q rc=$? $(el)"; grep -o '"n_prompt": [0-9]*, "n_gen": [0-9]*\|"avg_ts": [0-9.]*' $OUT/llama-bench-$q.jsonl | paste - - ; pack
done
