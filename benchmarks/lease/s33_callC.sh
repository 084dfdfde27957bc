#!/usr/bin/env bash
# Session 33, call C: gpt-oss's q4+q4 prompts (512 and 2,048 tokens; the gpt-oss-20b widths cut to 4 layers) with
# q4's split expert tiles (TIERED_QGROUPED_INTERLEAVE=0), then the interleaved ones (the default now), then split
# again, each in a fresh process on the same layout.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
i=0
for v in 0 1 0; do
  i=$((i + 1))
  TIERED_QGROUPED_INTERLEAVE=$v timeout 200 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts q4+q4 \
    --tiles "" --no-torch --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss-$i-il$v.log 2>&1
  echo "gptoss $i interleave=$v rc=$? $(el)"; grep -v '^{' $OUT/gptoss-$i-il$v.log | grep -iE "prefill|prompt" | tail -4
  cp $OUT/gpt_oss_gpu.json $OUT/gptoss-$i-il$v.json 2>/dev/null; pack
done
