#!/usr/bin/env bash
# Session 29, call A (cold box): the CUDA tests of session 28's CPU-tested changes (sampling on the device, sampled
# rows going ahead, the bf16 cut-over at 4, the engine's sampled and graphed paths) while the peers checkpoint and
# its two layouts are made, then s28_callD's batch runs (ahead against serial, bf16 B = 8 at cut-over 4 against 8,
# sampled batches), then `tiered run` sampled against greedy (q4+q4, 256 new tokens). As run, its `tiered run` helper
# passed its tag to the command and all four runs failed at the CLI; the helper is lib.sh's run_q4 since.
source "$(dirname "$0")/lib.sh"
(peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source) > $OUT/layouts.log 2>&1 &
LAY=$!
cuda_tests 240 tests/test_sampling.py tests/test_scheduler_ahead.py tests/test_scheduler.py tests/test_ahead.py \
  tests/test_engine.py tests/test_moe_kernels.py tests/test_quant_grouped.py \
  -k "cuda and (sample or ahead or temperature or graphs or decode_max or grouped_quant_10b)"
wait $LAY; cat $OUT/layouts.log; echo "layouts done $(el)"; pack
BATCH_TIMEOUT=70 batch_vram q4 layout-q4 1,8,32,128 graphs,serial
BATCH_TIMEOUT=70 batch_vram bf16 layout 1,8,32,128 graphs,serial
BATCH_TIMEOUT=70 batch_vram bf16-t8 layout 8 graphs TIERED_DECODE_MAX_T=8  # the cut-over before session 28
SAMPLE=1 BATCH_TIMEOUT=70 batch_vram q4-sampled layout-q4 1,8,32 graphs,serial
run_q4 greedy layout-q4
run_q4 sampled layout-q4 --temperature 0.8 --top-p 0.95 --seed 1
run_q4 greedy2 layout-q4
run_q4 sampled2 layout-q4 --temperature 0.8 --top-p 0.95 --seed 2
