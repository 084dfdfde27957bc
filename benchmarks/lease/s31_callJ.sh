#!/usr/bin/env bash
# Session 31, call J (cold box, the session's last 290 s): gpt-oss's first prompt chunk from CUDA graphs (mixed
# windows now graphable). The prefill-graph CUDA test (Qwen-shaped reference: the refactored plan), then
# bench_gpt_oss_gpu.py on bf16 and mxfp4+q8 experts: a 512-token prefill replayed from its bucket's graph against the
# same engine's eager prefill in the same process, and the torch expert path.
source "$(dirname "$0")/lib.sh"
cuda_tests 60 tests/test_engine.py -k prefill_graphs
timeout 170 python3 benchmarks/bench_gpt_oss_gpu.py --work /root/bgo --experts source,mxfp4+q8 --tiles "" \
  --repeats 3 --new 16 > $OUT/gptoss.log 2>&1
echo "gptoss rc=$? $(el)"; grep -v '^{' $OUT/gptoss.log | grep -v "attention sinks" | tail -10; pack
