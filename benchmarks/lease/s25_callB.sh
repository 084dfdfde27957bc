#!/usr/bin/env bash
# Session 25, call B: (1) the new split rule's CUDA tests; (2) qlinear at 1-16 rows (the multi-row GEMV up to
# quant_moe.MAX_ROWS) against quant_matmul under the split rule, for MAX_ROWS; (3) where a whole-model prefill goes
# (tools/profile_prefill.py): the q4+q4 10.6B 8-layer layout in VRAM at 512 / 2048 / 8192-token prompts, then bf16.
source "$(dirname "$0")/lib.sh"
cuda_tests 120 tests/test_quant_grouped.py -k "split_k"
timeout 170 python3 benchmarks/bench_quant_kernels.py --phase prefill --prefill-formats q4 --shapes none --with-dense \
  --no-gemlite --tokens 1,2,3,4,6,8,16,32,128 --max-seconds 160 > $OUT/rows.log 2>&1
echo "rows rc=$? $(el)"; grep -vE '^\{' $OUT/rows.log | grep -E "qlinear|quant_matmul  |gemlite|cuBLAS F" | tail -110
pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
timeout 120 python3 tools/profile_prefill.py -m $W/layout-q4 --tokens 512,2048,8192 --top 14 --json > $OUT/profile-prefill-q4.log 2>&1
echo "profile q4 rc=$? $(el)"; grep -E "^==|^   " $OUT/profile-prefill-q4.log | head -50
mv $OUT/profile-prefill.json $OUT/profile-prefill-q4.json 2>/dev/null; pack
peers_layout layout source source; pack
timeout 100 python3 tools/profile_prefill.py -m $W/layout --tokens 512,2048,8192 --top 14 --json > $OUT/profile-prefill-bf16.log 2>&1
echo "profile bf16 rc=$? $(el)"; grep -E "^==|^   " $OUT/profile-prefill-bf16.log | head -50
mv $OUT/profile-prefill.json $OUT/profile-prefill-bf16.json 2>/dev/null; pack
