#!/usr/bin/env bash
# Session 32, call B (cold box): prompt attention with sinks on flash attention (model/sinkflash.py).
#  - CUDA tests: the flash calls against the plain path, gpt-oss's bf16 prefill and batch step on flash, the
#    existing gpt-oss and batch CUDA tests (fresh prompts of every model now take flash over cu_seqlens);
#  - bench_gpt_oss_gpu.py (bf16 and q4+q4; 512- and 2048-token prompts: graphed, eager, eager on the plain path);
#  - bench_batch_gpu.py --profile-prompts 32 on both layouts (flash), and the bf16 one on the plain path.
source "$(dirname "$0")/lib.sh"
G=/root/bgo
cuda_tests 200 ${TESTS:-tests/test_sinkflash.py tests/test_gpt_oss.py tests/test_scheduler.py tests/test_batch_hybrid.py}
grep -q "^rc=0" $OUT/cuda-tests.log || { grep -B2 -A25 "_ test_" $OUT/cuda-tests.log | head -80; exit 1; }
timeout 330 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts source,q4+q4 --tiles "" --no-torch \
  --prefill-tokens 512,2048 --repeats 2 --new 16 > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -iE "prefill|tok/s" | tail -10; pack
for run in q4+q4:auto source:auto source:naive; do
  lay=${run%%:*}; m=${run##*:}
  TIERED_SINK_ATTN=$m timeout 100 python3 benchmarks/bench_batch_gpu.py --layout $G/layout-$lay --work /root/bb-$lay-$m \
    --phases vram --batches 32 --new-tokens 16 --paths graphs --routing own --profile-prompts 32 \
    --text .carry/shared/text > $OUT/batch-$lay-$m.log 2>&1
  echo "batch $lay $m rc=$? $(el)"; grep -E "prompts B=|tok/s" $OUT/batch-$lay-$m.log | cut -c1-700 | tail -2
  cp /root/bb-$lay-$m/batch_gpu.json $OUT/batch-$lay-$m.json 2>/dev/null; pack
done
