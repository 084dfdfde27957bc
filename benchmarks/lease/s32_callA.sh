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
gptoss_llama_bg
timeout 300 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts source,q4+q4 --tiles "" --no-torch \
  --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -iE "prefill|q4|source" | tail -8; pack
gptoss_gguf_bg $G
for lay in q4+q4 source; do
  timeout 120 python3 benchmarks/bench_batch_gpu.py --layout $G/layout-$lay --work /root/bb-$lay --phases vram \
    --batches 32 --new-tokens 16 --paths graphs --routing own --profile-prompts 32 --text .carry/shared/text \
    > $OUT/batch-$lay.log 2>&1
  echo "batch $lay rc=$? $(el)"; grep -E "prompts B=|tok/s" $OUT/batch-$lay.log | cut -c1-900 | tail -3
  cp /root/bb-$lay/batch_gpu.json $OUT/batch-$lay.json 2>/dev/null; pack
done
gptoss_llama_prompts $G 32
