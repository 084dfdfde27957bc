#!/usr/bin/env bash
# Session 32, call C (cold box): gpt-oss's prompts on flash attention with sinks against llama.cpp, same call.
#  - background: llama.cpp's build (10 jobs), then the bf16 GGUF of the gpt-oss checkpoint and Q4_0;
#  - bench_gpt_oss_gpu.py (bf16 and q4+q4; 512- and 2048-token prompts: graphed, eager, eager on the plain path);
#  - bench_batch_gpu.py: 32 prompts of 64 tokens, 16 new tokens, on both layouts;
#  - llama-bench pp512 / pp2048 and llama-batched-bench (64-token prompts, 16 new, B = 1, 8, 32: the first two
#    warm it up) on bf16 and Q4_0.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
gptoss_llama_bg
timeout 330 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts source,q4+q4 --tiles "" --no-torch \
  --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -E "^  " | tail -6; pack
gptoss_gguf_bg $G
for lay in q4+q4 source; do
  timeout 100 python3 benchmarks/bench_batch_gpu.py --layout $G/layout-$lay --work /root/bb-$lay --phases vram \
    --batches 8,32 --new-tokens 16 --paths graphs --routing own --text .carry/shared/text > $OUT/batch-$lay.log 2>&1
  echo "batch $lay rc=$? $(el)"; grep -E "B=32" $OUT/batch-$lay.log | cut -c1-200 | tail -1
  cp /root/bb-$lay/batch_gpu.json $OUT/batch-$lay.json 2>/dev/null; pack
done
gptoss_llama_prompts $G 1,8,32
