#!/usr/bin/env bash
# Runs at 4ec4f6a (git checkout 4ec4f6a first): the warm and tests/test_l2warm.py were reverted after this call.
# Session 30, call A (cold box): warming L2 a layer ahead (kernels/l2warm.py, TIERED_L2_WARM). The CUDA tests of the
# warm and of session 29's unrun GPU paths (sampled top-k graphs, the refactored nucleus kernels, steps ahead with
# sampled rows) while the peers checkpoint and its layouts are made; then the VRAM decode (bench_peers.py, one
# process each) of q4+q4 and bf16 with the warm off and on (lines / last / bulk; without the experts' down rows;
# without the lm_head's), the q4 off/lines pair again last; `tiered run --top-k 40`.
source "$(dirname "$0")/lib.sh"
(peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source) > $OUT/layouts.log 2>&1 &
LAY=$!
cuda_tests 200 tests/test_l2warm.py tests/test_sampling.py tests/test_scheduler_ahead.py tests/test_ahead.py \
  -k "cuda and (warm or sampl or ahead or draws)"
while [ ! -f $W/layout-q4/manifest.json ] && kill -0 $LAY 2>/dev/null; do sleep 2; done; echo "q4 layout $(el)"
peers_vram q4 off
peers_vram q4 lines TIERED_L2_WARM=lines
peers_vram q4 bulk TIERED_L2_WARM=bulk
wait $LAY; cat $OUT/layouts.log; echo "layouts done $(el)"; pack
peers_vram bf16 off
peers_vram bf16 lines TIERED_L2_WARM=lines
peers_vram q4 last TIERED_L2_WARM=last
peers_vram q4 nodown TIERED_L2_WARM=lines TIERED_L2_WARM_DOWN=0
peers_vram q4 off2
peers_vram q4 lines2 TIERED_L2_WARM=lines
run_q4 q4-topk layout-q4 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 1
