#!/usr/bin/env bash
# Session 29, call B (cold box): sampling on the device by the kernels of kernels/nucleus.py. The sampler alone
# against the sort it replaced (bench_sampling.py) and the CUDA sampling tests while the peers layouts are made,
# then batches greedy against sampled (temperature 0.8, top-p 0.95) and `tiered run` sampled against greedy.
source "$(dirname "$0")/lib.sh"
(peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source) > $OUT/layouts.log 2>&1 &
LAY=$!
timeout 120 python3 benchmarks/bench_sampling.py > $OUT/sampling.log 2>&1; echo "sampling rc=$? $(el)"
grep -E "^R=|FAILED" $OUT/sampling.log; pack
cuda_tests 200 tests/test_sampling.py tests/test_scheduler_ahead.py tests/test_engine.py -k "cuda"
wait $LAY; cat $OUT/layouts.log; echo "layouts done $(el)"; pack
batch_vram q4 layout-q4 1,8,32,128 graphs
SAMPLE=1 batch_vram q4-sampled layout-q4 1,8,32,128 graphs,serial
SAMPLE=1 batch_vram bf16-sampled layout 1,8,32,128 graphs
run_q4 q4-greedy layout-q4
run_q4 q4-sampled layout-q4 --temperature 0.8 --top-p 0.95 --seed 1
run_q4 q4-topk layout-q4 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1
run_q4 bf16-greedy layout
run_q4 bf16-sampled layout --temperature 0.8 --top-p 0.95 --seed 1
