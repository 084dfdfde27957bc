#!/usr/bin/env bash
# Session 8, lease call B: llama.cpp and tiered on the same 8-layer 10.6B-shape model in ONE call (issue 13's
# same-run Q4_0 baseline), with PDL (kernels/pdl.py, on by default) and the L2 prefetch of the dense q4 GEMV.
# llama.cpp builds on the CPU while the GPU makes the checkpoint (seed 0), the bf16 GGUF and the two tiered layouts
# (bf16; q4 experts + q4 dense), with the CUDA tests of this session's kernels beside them (untimed); then Q4_0,
# llama-bench (GPU bf16 and GPU Q4_0), and tiered's VRAM decode/prefill for both layouts, PDL on then off.
source "$(dirname "$0")/lib.sh"
CUDA_TESTS="tests/test_pdl.py tests/test_devtable.py tests/test_moe_kernels.py tests/test_quant_kernels.py
 tests/test_cache.py tests/test_fused_glue.py tests/test_attention_decode.py"
llama_bg
(timeout 260 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short $CUDA_TESTS > $OUT/cuda-tests.log 2>&1
 echo "rc=$?" >> $OUT/cuda-tests.log) &
TESTS=$!
peers_layout layout source source
peers_layout layout-q4 q4 q4
wait $CONV; wait $BUILD; grep -E "built|rc=" $OUT/build.log; echo "build done $(el)"
wait $TESTS; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -14; echo "tests done $(el)"
pack
timeout 100 python3 benchmarks/bench_peers.py --phase model --work $W > $OUT/model.log 2>&1; echo "model rc=$? $(el)"; tail -2 $OUT/model.log
timeout 110 python3 benchmarks/bench_peers.py --phase llama --work $W --llama-only gpu_bf16,gpu_q4_0 > $OUT/llama.log 2>&1
echo "llama rc=$? $(el)"; tail -4 $OUT/llama.log; cp $W/llama.json $W/model.json $OUT/ 2>/dev/null
pack
for pdl in 1 0; do
  for v in q4 bf16; do peers_vram $v pdl$pdl TIERED_PDL=$pdl; done
  [ $pdl = 1 ] && { cp $OUT/tiered-bf16-pdl1.json $W/tiered.json; cp $OUT/tiered-q4-pdl1.json $W/tiered-q4.json;
    python3 benchmarks/bench_peers.py --phase report --work $W --results-dir $OUT > $OUT/report.log 2>&1;
    echo "report rc=$?"; grep -iE "q4|decode" $OUT/report.log | grep -v '^{' | head -12; pack; }
done
