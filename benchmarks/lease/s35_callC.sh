#!/usr/bin/env bash
# Session 35, call C, the final rule (swap 5 with the scales a step ahead, ps 1; q4 takes the many-rows tile from 64
# rows an expert like mxfp4; swap 4 keeps ps 0): CUDA tests of the picks (gpt-oss T 600 is q4's new tile), the kernel
# bench under the reference routing (10.6B: T 1024 = 64 rows an expert with --ps-sweep, T 512 / 2048 the picks),
# gpt-oss's shape (uniform) at T 512 / 2048, then whole 10.6B prompts (q4+q4 at the rule and with
# TIERED_QGROUPED_PS=0, bf16) at 512, 1,024 and 2,048 tokens.
source "$(dirname "$0")/lib.sh"
cuda_tests 120 "tests/test_quant_grouped.py::test_cuda_grouped_gpt_oss_shape" \
  "tests/test_quant_grouped.py::test_cuda_grouped_quant_10b_shape" \
  "tests/test_quant_grouped.py::test_cuda_engine_prefill_takes_the_grouped_kernels" \
  -k "gpt_oss or None or engine_prefill"
timeout 110 python3 benchmarks/bench_quant_kernels.py --phase prefill --routing replay --text .carry/shared/text/fit \
  --shapes 10.6B --prefill-formats q4,mxfp4 --tokens 1024 --ps-sweep --no-gemlite --max-seconds 100 \
  > $OUT/rule-1024.log 2>&1
echo "rule 1024 rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/rule-1024.json 2>/dev/null; pack
grep -E "grouped" $OUT/rule-1024.log | cut -c1-130
timeout 90 python3 benchmarks/bench_quant_kernels.py --phase prefill --routing replay --text .carry/shared/text/fit \
  --shapes 10.6B --prefill-formats q4,mxfp4 --tokens 512,2048 --no-gemlite --max-seconds 80 > $OUT/rule-replay.log 2>&1
echo "rule replay rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/rule-replay.json 2>/dev/null; pack
grep -E "auto" $OUT/rule-replay.log | cut -c1-130
timeout 70 python3 benchmarks/bench_quant_kernels.py --phase prefill --shapes gpt-oss --prefill-formats q4,mxfp4 \
  --tokens 512,2048 --no-gemlite --max-seconds 60 > $OUT/rule-gptoss.log 2>&1
echo "rule gpt-oss rc=$? $(el)"; cp $OUT/quant_prefill.json $OUT/rule-gptoss.json 2>/dev/null; pack
grep -E "auto" $OUT/rule-gptoss.log | cut -c1-130
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
for v in "layout-q4 rule" "layout-q4 0" "layout rule"; do
  set -- $v
  if [ "$2" = rule ]; then unset TIERED_QGROUPED_PS; else export TIERED_QGROUPED_PS=$2; fi
  timeout 80 python3 tools/profile_prefill.py -m $W/$1 --tokens 512,1024,2048 --repeats 5 --no-profile \
    > $OUT/prompt-$1-ps$2.log 2>&1
  echo "prompt $1 ps$2 rc=$? $(el)"; grep "==" $OUT/prompt-$1-ps$2.log; pack
done
