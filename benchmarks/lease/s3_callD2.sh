#!/usr/bin/env bash
# Session 3, lease call D2: the CUDA tests of this session's merged work (device table, fp8 kernels, pacing, CPU
# experts, quantized grouped GEMM, hybrid batch) and the quantized prefill benchmark.
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py tests/test_quant_kernels.py \
  tests/test_deepseek_v3.py tests/test_cpu_experts.py tests/test_quant_grouped.py tests/test_batch_hybrid.py > $OUT/cuda-tests.log 2>&1
echo "cuda tests rc=$?"; tail -12 $OUT/cuda-tests.log
pack
timeout 130 python3 benchmarks/bench_quant_kernels.py --phase prefill --max-seconds 100 > $OUT/quant-prefill.log 2>&1
echo "prefill rc=$?"; grep -v '^{' $OUT/quant-prefill.log | tail -25
