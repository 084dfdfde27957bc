#!/usr/bin/env bash
# Session 16, call F1 (cold box): the CUDA tests of the router kernels (norm_router_topk: the add+norm inside the
# router's launch, the model's one-token path now), the graphed glue decode against the torch glue, the engine's
# graphs against eager, the batch path against transformers and the q4 kernels; the router alone (bench_router.py,
# with the norm-in rows and fewer-warp tiles); then the peers checkpoint and its q4+q4 and bf16 repacks for F2.
source "$(dirname "$0")/lib.sh"
cuda_tests 200 tests/test_fused_glue.py tests/test_engine.py tests/test_batch_hybrid.py tests/test_quant_kernels.py
timeout 100 python3 benchmarks/bench_router.py > $OUT/router.log 2>&1; echo "router rc=$? $(el)"
grep -v '^{' $OUT/router.log | tail -40; pack
peers_layouts
