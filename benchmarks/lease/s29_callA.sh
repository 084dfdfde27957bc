#!/usr/bin/env bash
# Session 29, call A (cold box): the CUDA tests of session 28's CPU-tested changes (sampling on the device, sampled
# rows going ahead, the bf16 cut-over at 4, the engine's sampled and graphed paths) while the peers checkpoint and
# its two layouts are made, then s28_callD's batch runs (ahead against serial, bf16 B = 8 at cut-over 4 against 8,
# sampled batches), then `tiered run` sampled against greedy (q4+q4, 256 new tokens).
source "$(dirname "$0")/lib.sh"
(peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source) > $OUT/layouts.log 2>&1 &
LAY=$!
cuda_tests 240 tests/test_sampling.py tests/test_scheduler_ahead.py tests/test_scheduler.py tests/test_ahead.py \
  tests/test_engine.py tests/test_moe_kernels.py tests/test_quant_grouped.py \
  -k "cuda and (sample or ahead or temperature or graphs or decode_max or grouped_quant_10b)"
wait $LAY; cat $OUT/layouts.log; echo "layouts done $(el)"; pack
batch() {  # TAG LAYOUT BATCHES PATHS [VAR=VALUE ...]
  local tag=$1 lay=$2 bs=$3 paths=$4; shift 4
  rm -f /root/bb-$tag/batch_gpu.json
  env "$@" timeout 70 python3 benchmarks/bench_batch_gpu.py --layout $W/$lay --work /root/bb-$tag --phases vram \
    --batches $bs --paths $paths --routing own --text .carry/shared/text ${SAMPLE:+--temperature 0.8 --top-p 0.95} \
    > $OUT/batch-$tag.log 2>&1
  echo "batch $tag rc=$? $(el)"; grep -E "tok/s" $OUT/batch-$tag.log | cut -c1-200 | tail -8
  cp /root/bb-$tag/batch_gpu.json $OUT/batch-$tag.json 2>/dev/null; pack
}
batch q4 layout-q4 1,8,32,128 graphs,serial
batch bf16 layout 1,8,32,128 graphs,serial
batch bf16-t8 layout 8 graphs TIERED_DECODE_MAX_T=8  # the cut-over before session 28
SAMPLE=1 batch q4-sampled layout-q4 1,8,32 graphs,serial
run1() {  # TAG ARGS...: tiered run on the q4+q4 layout, 256 new tokens, --json's decode_tok_s
  timeout 60 python3 -m tiered run -m $W/layout-q4 --device cuda --max-new-tokens 256 --json "$@" \
    "def fibonacci(n):" > $OUT/run-$1.out 2> $OUT/run-$1.err
  echo "run $1 rc=$? $(el) $(tail -1 $OUT/run-$1.err | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print(d["decode_tok_s"], d["tokens_generated"])' 2>&1 | tail -1)"
  pack
}
run1 greedy
run1 sampled --temperature 0.8 --top-p 0.95 --seed 1
run1 greedy2
run1 sampled2 --temperature 0.8 --top-p 0.95 --seed 2
