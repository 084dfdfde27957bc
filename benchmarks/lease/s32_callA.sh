#!/usr/bin/env bash
# Session 32, call A (cold box): where a batch of prompts spends its time, and gpt-oss's single prompts on the fixed
# clock (0dab4ae) against llama-bench pp512 / pp2048.
#  - background: llama.cpp's build, then the bf16 GGUF of the gpt-oss checkpoint, Q4_0, llama-bench pp512 / pp2048
#    and llama-batched-bench (32 prompts of 64 tokens) on bf16 and Q4_0;
#  - bench_gpt_oss_gpu.py (gpt-oss-20b widths cut to 4 layers; bf16 and q4+q4): a 512- and a 2048-token prompt,
#    graphed against eager, synchronised;
#  - bench_batch_gpu.py --profile-prompts 32 on both layouts: the prompt step of 32 fresh 64-token rows, host and
#    device time under torch.profiler.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
(JOBS=10 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/build.log 2>&1; echo "build rc=$?" >> $OUT/build.log) &
BUILD=$!
timeout 300 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts source,q4+q4 --tiles "" --no-torch \
  --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -iE "prefill|q4|source" | tail -8; pack
(python3 tools/convert_gguf.py --llama-dir .carry/llama.cpp $G/ck --outtype bf16 --outfile $G/model-bf16.gguf.tmp \
  > $OUT/convert.log 2>&1 && mv $G/model-bf16.gguf.tmp $G/model-bf16.gguf; echo "convert rc=$? $(el)") &
CONV=$!
for lay in q4+q4 source; do
  timeout 120 python3 benchmarks/bench_batch_gpu.py --layout $G/layout-$lay --work /root/bb-$lay --phases vram \
    --batches 32 --new-tokens 16 --paths graphs --routing own --profile-prompts 32 --text .carry/shared/text \
    > $OUT/batch-$lay.log 2>&1
  echo "batch $lay rc=$? $(el)"; grep -E "prompts B=|tok/s" $OUT/batch-$lay.log | cut -c1-900 | tail -3
  cp /root/bb-$lay/batch_gpu.json $OUT/batch-$lay.json 2>/dev/null; pack
done
wait $CONV; wait $BUILD; echo "build $(tail -1 $OUT/build.log) $(el)"; pack
[ -f $G/model-Q4_0.gguf ] || timeout 100 /root/lb/bin/llama-quantize $G/model-bf16.gguf $G/model-Q4_0.gguf Q4_0 16 \
  > $OUT/quantize.log 2>&1
echo "quantize rc=$? $(el)"
for q in bf16 Q4_0; do
  timeout 80 /root/lb/bin/llama-bench -m $G/model-$q.gguf -ngl 99 -p 512,2048 -n 0 -r 3 -o json \
    > $OUT/llama-bench-$q.json 2> $OUT/llama-bench-$q.err
  echo "bench $q rc=$? $(el)"; python3 -c "
import json; [print(r['n_prompt'], r['n_gen'], round(r['avg_ts'], 1)) for r in json.load(open('$OUT/llama-bench-$q.json'))]"
  timeout 60 /root/lb/bin/llama-batched-bench -m $G/model-$q.gguf -ngl 99 -c 8192 -b 2048 -ub 512 -npp 64 \
    -ntg 16 -npl 32 --output-format jsonl > $OUT/llama-batched-$q.jsonl 2> $OUT/llama-batched-$q.err
  echo "batched $q rc=$? $(el)"; grep -o '"speed_pp": [0-9.]*\|"speed_tg": [0-9.]*' $OUT/llama-batched-$q.jsonl | paste - -
  pack
done
