#!/usr/bin/env bash
# Session 16, call A (cold box). 1) The router of one decode token alone (benchmarks/bench_router.py): cuBLAS + the
# softmax-top-k kernel against the GEMV kernel and the fused GEMV + top-k (kernels/fused_route.router_topk), each
# after an add+norm, 160 layers a graph, at the 10.6B and 397B shapes. 2) The q4 down tiles prepared in session 15
# (several-step word tiles, h handed word-major: QConfig.hw), the default gate/up beside each; the fastest applied
# on the box (tools/apply_tuned.py) for call B. 3) The peers checkpoint and its q4+q4 and bf16 repacks, the CUDA
# tests of the router and glue kernels and of the q4 kernels beside them (untimed).
source "$(dirname "$0")/lib.sh"
timeout 120 python3 benchmarks/bench_router.py > $OUT/router.log 2>&1; echo "router rc=$? $(el)"
grep -v '^{' $OUT/router.log | tail -30; pack
timeout 200 python3 benchmarks/bench_quant_kernels.py --formats q4 --shapes 10.6B --down-only --no-dense \
  --max-seconds 420 > $OUT/qk-down.log 2>&1; echo "qk rc=$? $(el)"
grep -E "^experts|^parts" $OUT/qk-down.log | tail -40
mkdir -p /root/keep; cp tiered/kernels/quant_moe.py /root/keep/quant_moe.py.orig
python3 tools/apply_tuned.py $OUT/quant_kernels.json | tail -4; git diff --stat; cp tiered/kernels/quant_moe.py $OUT/
cp $OUT/quant_kernels.json /root/keep/ 2>/dev/null; pack
(timeout 330 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_fused_glue.py \
   tests/test_quant_kernels.py > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
TESTS=$!
peers_layouts
wait $TESTS; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -14; echo "tests done $(el)"
pack
