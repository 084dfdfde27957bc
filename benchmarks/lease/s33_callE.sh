#!/usr/bin/env bash
# Session 33, call E: how q4's interleaved tile turns codes into values (GroupedConfig.dq: 0 int->float conversions,
# 1 exponent bits or-ed in, 2 in bf16). The CUDA tests of dq 1 / 2 at the 10.6B shape, DQ_SWEEP at the 10.6B and
# gpt-oss shapes (T 512, 2,048), then gpt-oss's q4+q4 prompts under TIERED_QGROUPED_DQ 0, 1, 2 (fresh processes).
source "$(dirname "$0")/lib.sh"
cuda_tests 100 "tests/test_quant_grouped.py::test_cuda_grouped_quant_10b_shape" -k "dq"
timeout 110 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes 10.6B,gpt-oss --prefill-formats q4 \
  --tokens 512,2048 --dq-sweep --no-gemlite --max-seconds 95 > $OUT/dq.log 2>&1
echo "dq rc=$? $(el)"; grep -E "dq[012]|auto" $OUT/dq.log | grep -v bf16 | cut -c1-110; cp $OUT/quant_prefill.json $OUT/dq.json 2>/dev/null; pack
G=/root/bgo
for v in 0 1 2; do
  TIERED_QGROUPED_DQ=$v timeout 100 python3 benchmarks/bench_gpt_oss_gpu.py --work $G --keep --experts q4+q4 \
    --tiles "" --no-torch --prefill-tokens 512,2048 --repeats 3 --new 16 > $OUT/gptoss-dq$v.log 2>&1
  echo "gptoss dq=$v rc=$? $(el)"; grep -v '^{' $OUT/gptoss-dq$v.log | grep -iE "prefill of" | tail -2 | cut -c1-90
  cp $OUT/gpt_oss_gpu.json $OUT/gptoss-dq$v.json 2>/dev/null; pack
done
