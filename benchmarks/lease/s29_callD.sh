#!/usr/bin/env bash
# Session 29, call D (cold box): sampling inside the graphs. The CUDA tests of the sampling kernels, the batch
# graphs' in-graph draws and the engine's sampled graphs, and the sampler alone, while the peers checkpoint and its
# q4+q4 layout are made; then batches greedy against sampled (temperature 0.8, top-p 0.95; B = 1, 8, 32, 128) and
# `tiered run` greedy / sampled / sampled with top-k.
source "$(dirname "$0")/lib.sh"
(peers_ckpt; peers_layout layout-q4 q4 q4) > $OUT/layouts.log 2>&1 &
LAY=$!
cuda_tests 170 tests/test_sampling.py tests/test_scheduler_ahead.py tests/test_ahead.py \
  -k "cuda and (sampl or ahead or draws)"
timeout 90 python3 benchmarks/bench_sampling.py --iters 20 > $OUT/sampling.log 2>&1; echo "sampling rc=$? $(el)"
grep -E "^R=|FAILED" $OUT/sampling.log; pack
wait $LAY; cat $OUT/layouts.log; echo "layouts done $(el)"; pack
batch() {  # TAG LAYOUT BATCHES PATHS [VAR=VALUE ...]
  local tag=$1 lay=$2 bs=$3 paths=$4; shift 4
  rm -f /root/bb-$tag/batch_gpu.json
  env "$@" timeout 90 python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$tag --phases vram \
    --batches $bs --paths $paths --routing own --text .carry/shared/text ${SAMPLE:+--temperature 0.8 --top-p 0.95} \
    > $OUT/batch-$tag.log 2>&1
  echo "batch $tag rc=$? $(el)"; grep -E "tok/s" $OUT/batch-$tag.log | cut -c1-200 | tail -8
  cp /root/bb-$tag/batch_gpu.json $OUT/batch-$tag.json 2>/dev/null; pack
}
SAMPLE=1 batch q4-sampled layout-q4 1,8,32,128 graphs,serial
batch q4 layout-q4 1,8,32,128 graphs
run1() {  # TAG LAYOUT ARGS...: tiered run, 256 new tokens, --json's decode_tok_s
  local tag=$1 lay=$2; shift 2
  timeout 60 python3 -m tiered run -m $W/$lay --device cuda --max-new-tokens 256 --json "$@" "def fibonacci(n):" \
    > $OUT/run-$tag.out 2> $OUT/run-$tag.err
  echo "run $tag rc=$? $(el) $(tail -1 $OUT/run-$tag.err | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["decode_tok_s"], d["tokens_generated"], d["step_ahead"], d["capture_in_call_s"])' 2>&1 | tail -1)"
  pack
}
run1 q4-greedy layout-q4
run1 q4-sampled layout-q4 --temperature 0.8 --top-p 0.95 --seed 1
run1 q4-topk layout-q4 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1
run1 q4-sampled2 layout-q4 --temperature 0.8 --top-p 0.95 --seed 2
