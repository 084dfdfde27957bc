#!/usr/bin/env bash
# Session 4 (2026-12-01), lease call A: build llama.cpp alone (it slows down by half with GPU work beside it), then
# the whole CUDA test suite beside the families' bf16 checks on the GPU (correctness only: nothing here is timed).
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
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
