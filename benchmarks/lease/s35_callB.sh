#!/usr/bin/env bash
# Session 35, call B: the quantized grouped kernels' interleaved tiles loading the next step's scales during this
# step (GroupedConfig.ps 1, now the picks' default; TIERED_QGROUPED_PS=0 the old way). CUDA tests of ps 1 (the
# 10.6B shape, gpt-oss's, quant_matmul), then the kernel bench under the reference routing with --ps-sweep at the
# 10.6B and 397B shapes (q4, mxfp4) and uniform at the gpt-oss shape, then whole 10.6B prompts (q4+q4 with ps 1
# and 0, bf16), tools/profile_prefill.py --no-profile.
source "$(dirname "$0")/lib.sh"
cuda_tests 150 "tests/test_quant_grouped.py::test_cuda_grouped_quant_10b_shape" \
  "tests/test_quant_grouped.py::test_cuda_quant_matmul_interleaved" \
  "tests/test_quant_grouped.py::test_cuda_grouped_gpt_oss_shape" \
  "tests/test_quant_grouped.py::test_cuda_engine_prefill_takes_the_grouped_kernels" \
  -k "ps1 or None or interleaved or gpt_oss or engine_prefill"
timeout 150 python3 benchmarks/bench_quant_kernels.py --phase prefill --routing replay --text .carry/shared/text/fit \
  --shapes 10.6B,397B --prefill-formats q4,mxfp4 --tokens 512,2048 --ps-sweep --no-gemlite --max-seconds 135 \
  > $OUT/ps-replay.log 2>&1
echo "ps replay rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/ps-replay.json 2>/dev/null; pack
grep -E "grouped" $OUT/ps-replay.log | cut -c1-130 | head -60
timeout 60 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes gpt-oss --prefill-formats q4,mxfp4 \
  --tokens 512,2048 --ps-sweep --no-gemlite --max-seconds 50 > $OUT/ps-gptoss.log 2>&1
echo "ps gpt-oss rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/ps-gptoss.json 2>/dev/null; pack
grep -E "auto|ps" $OUT/ps-gptoss.log | grep grouped | cut -c1-130 | head -20
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in "layout-q4 1" "layout-q4 0" "layout 1"; do
  set -- $v
  TIERED_QGROUPED_PS=$2 timeout 70 python3 tools/profile_prefill.py -m $W/$1 --tokens 512,2048 --repeats 5 \
    --no-profile > $OUT/prompt-$1-ps$2.log 2>&1
  echo "prompt $1 ps$2 rc=$? $(el)"; grep "==" $OUT/prompt-$1-ps$2.log; pack
done
