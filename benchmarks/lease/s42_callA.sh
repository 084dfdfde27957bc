#!/usr/bin/env bash
# Session 42, call A: the q4 GEMV's programs looping over row blocks with the next block's first step loaded ahead
# (QConfig.persist, quant_moe.gemv_loop; float word tile and 8-bit inputs). First the loop's tests on CUDA (the
# interpreter tests of test_quant_kernels.py / test_gpu_act_q8.py run compiled where a GPU is), then
# benchmarks/bench_gemv_loop_gpu.py (lm_head, qkv, o_proj: TUNED's tile against the loop tiles) -> gemv_loop.json,
# whose "qconfig" call B reads; then the act 1 products on this GPU (bench_act8_gpu.py --quick).
source "$(dirname "$0")/lib.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_quant_kernels.py tests/test_gpu_act_q8.py \
  -k "looping or cuda_dense or gemv_loop" > $OUT/loop-tests.log 2>&1
echo "tests rc=$? $(el)"; tail -3 $OUT/loop-tests.log; pack
timeout 300 python3 benchmarks/bench_gemv_loop_gpu.py > $OUT/gemv-loop.log 2>&1
echo "gemv loop rc=$? $(el)"; grep -vE '^\{' $OUT/gemv-loop.log | tail -6
grep -E '^\{"product' $OUT/gemv-loop.log | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); c = r['config']
    print(r['product'], c['bn'], c['bg'], c['warps'], c['conv'], c['persist'], c['act'], c['ahead'],
          round(r.get('us', 0), 1), round(r.get('tbps', 0), 2), r.get('failed', ''))"
pack
[ $(( $(date +%s) - T0 )) -lt 420 ] && timeout 150 python3 benchmarks/bench_act8_gpu.py --quick \
  > $OUT/act8-kernels-quick.log 2>&1; grep -vE '^\{' $OUT/act8-kernels-quick.log | tail -6
pack
