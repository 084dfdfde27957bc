#!/usr/bin/env bash
# Session 41, call C: after call A (H100) showed act 1's GEMVs off the reference by 4-5e-4 on some inputs, the
# reference's d fixed (PyTorch's CUDA division by a Python scalar multiplies by the reciprocal); the CUDA tests again
# and the quick kernel bench (TUNED's tiles, act 0 and 1, each checked against the reference before timing).
source "$(dirname "$0")/lib.sh"
cuda_tests 120 tests/test_gpu_act_q8.py
timeout 200 python3 benchmarks/bench_act8_gpu.py --quick > $OUT/act8-kernels-quick.log 2>&1
echo "act8 quick rc=$? $(el)"; grep -vE '^\{' $OUT/act8-kernels-quick.log | tail -8
grep -E '^\{"product' $OUT/act8-kernels-quick.log | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); print(r['product'], (r.get('config') or {}).get('act'), round(r.get('us', 0), 1), r.get('rel_err'), r.get('failed', ''))"
pack
