#!/usr/bin/env bash
# Session 4 (2026-12-01), lease call A: build llama.cpp alone (it slows down by half with GPU work beside it), then
# the whole CUDA test suite beside the families' bf16 checks on the GPU (correctness only: nothing here is timed).
source "$(dirname "$0")/lib.sh"
T0=$(date +%s)
timeout 290 bash tools/build_llamacpp.sh .carry/llama.cpp /root/lb > $OUT/llama-build.log 2>&1; echo "build rc=$? $(( $(date +%s) - T0 )) s"
tail -3 $OUT/llama-build.log
pack
(timeout 300 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short -rf tests > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
timeout 250 python3 benchmarks/bench_families_gpu.py --work /root/fam --families qwen3_5_moe,gpt_oss,deepseek_v3 > $OUT/families.log 2>&1; echo "families rc=$?"
pack
wait
grep -v '^{' $OUT/families.log | tail -20; grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -30
echo "total $(( $(date +%s) - T0 )) s"
