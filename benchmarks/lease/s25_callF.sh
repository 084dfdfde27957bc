#!/usr/bin/env bash
# Session 25, call F: the new defaults on the GPU. CUDA tests: the long prefill chunk against 512 (reference model,
# fp32), the engine's prefill through the grouped kernels, greedy tokens against transformers, qlinear at few rows
# (MAX_ROWS 2, split-K). Then the 10.6B 8-layer q4+q4 and bf16 layouts in VRAM: prefill at 512 / 2,048 / 4,000 tokens
# with the default chunk (pick_prefill_chunk) and at 512 (the old default) in the same process; and bench_peers'
# tiered phase (prefill 512 through generate, decode) for q4 and bf16.
source "$(dirname "$0")/lib.sh"
cuda_tests 170 tests/test_engine.py tests/test_quant_grouped.py tests/test_quant_kernels.py tests/test_batch_hybrid.py \
  -k "long_prefill_chunk or engine_prefill_takes or qlinear_dense_shapes or batched_agrees"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  timeout 80 python3 tools/profile_prefill.py -m $W/$lay --tokens 512,2048,4000 --chunks 0,512 --no-profile \
    --json > $OUT/default-$v.log 2>&1
  echo "default $v rc=$? $(el)"; grep -E "^==" $OUT/default-$v.log; mv $OUT/profile-prefill.json $OUT/default-$v.json; pack
done
