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
SAMPLE=1 BATCH_TIMEOUT=90 batch_vram q4-sampled layout-q4 1,8,32,128 graphs,serial
BATCH_TIMEOUT=90 batch_vram q4 layout-q4 1,8,32,128 graphs
run_q4 q4-greedy layout-q4
run_q4 q4-sampled layout-q4 --temperature 0.8 --top-p 0.95 --seed 1
run_q4 q4-topk layout-q4 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1
run_q4 q4-sampled2 layout-q4 --temperature 0.8 --top-p 0.95 --seed 2
