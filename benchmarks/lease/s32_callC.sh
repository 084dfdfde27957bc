#!/usr/bin/env bash
# Session 32, call C (cold box): gpt-oss's prompts on flash attention with sinks against llama.cpp, same call.
#  - background: llama.cpp's build (10 jobs), then the bf16 GGUF of the gpt-oss checkpoint and Q4_0;
#  - bench_gpt_oss_gpu.py (bf16 and q4+q4; 512- and 2048-token prompts: graphed, eager, eager on the plain path);
#  - bench_batch_gpu.py: 32 prompts of 64 tokens, 16 new tokens, on both layouts;
#  - llama-bench pp512 / pp2048 and llama-batched-bench (64-token prompts, 16 new, B = 1, 8, 32: the first two
#    warm it up) on bf16 and Q4_0.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
(JOBS=10 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/build.log 2>&1; echo "build rc=$?" >> $OUT/build.log) &
BUILD=$!
timeout 330 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts source,q4+q4 --tiles "" --no-torch \
  --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -E "^  " | tail -6; pack
(python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp $G/ck --outtype bf16 --outfile $G/model-bf16.gguf.tmp \
  > $OUT/convert.log 2>&1 && mv $G/model-bf16.gguf.tmp $G/model-bf16.gguf; echo "convert rc=$? $(el)") &
CONV=$!
for lay in q4+q4 source; do
  timeout 100 python3 benchmarks/bench_batch_gpu.py --layout $G/layout-$lay --work /root/bb-$lay --phases vram \
    --batches 8,32 --new-tokens 16 --paths graphs --routing own --text .carry/shared/text > $OUT/batch-$lay.log 2>&1
  echo "batch $lay rc=$? $(el)"; grep -E "B=32" $OUT/batch-$lay.log | cut -c1-200 | tail -1
  cp /root/bb-$lay/batch_gpu.json $OUT/batch-$lay.json 2>/dev/null; pack
done
wait $CONV; wait $BUILD; echo "build $(tail -1 $OUT/build.log) $(el)"; pack
timeout 100 /root/lb/bin/llama-quantize $G/model-bf16.gguf $G/model-Q4_0.gguf Q4_0 16 > $OUT/quantize.log 2>&1
echo "quantize rc=$? $(el)"
for q in bf16 Q4_0; do
  timeout 80 /root/lb/bin/llama-bench -m $G/model-$q.gguf -ngl 99 -p 512,2048 -n 0 -r 3 -o json \
    > $OUT/llama-bench-$q.json 2> $OUT/llama-bench-$q.err
  echo "bench $q rc=$? $(el)"; python3 -c "
import json; [print(r['n_prompt'], r['n_gen'], round(r['avg_ts'], 1)) for r in json.load(open('$OUT/llama-bench-$q.json'))]"
  timeout 60 /root/lb/bin/llama-batched-bench -m $G/model-$q.gguf -ngl 99 -c 8192 -b 2048 -ub 512 -npp 64 \
    -ntg 16 -npl 1,8,32 --output-format jsonl > $OUT/llama-batched-$q.jsonl 2> $OUT/llama-batched-$q.err
  echo "batched $q rc=$? $(el)"; grep -o '"pl": [0-9]*\|"speed_pp": [0-9.]*\|"speed_tg": [0-9.]*' $OUT/llama-batched-$q.jsonl | paste - - -
  pack
done
