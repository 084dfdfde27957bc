#!/usr/bin/env bash
# Session 2026-11-30 evening, lease call 1: build llama.cpp and make the 8-layer model, its GGUFs and layouts
# (bf16, q4 experts, q4 experts + q4 dense) under /root/peers; meanwhile on the GPU: the quantized-kernel sweep and
# the CUDA tests. Everything else in this lease reads what this call leaves under /root.
set -u
export PYTHONUNBUFFERED=1
# every file goes to R (JSON and logs), packed into one archive under the real $OUT when the script exits
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }  # after each step: a kill keeps the last
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
(PYTHONPATH=/tmp/site timeout 330 python3 benchmarks/bench_quant_kernels.py > $OUT/quant_kernels.log 2>&1; echo "rc=$?" >> $OUT/quant_kernels.log
 PYTHONPATH=/tmp/site timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log) &
JOBS=12 bash tools/build_llamacpp.sh > $OUT/build.log 2>&1; echo "build rc=$?"; tail -2 $OUT/build.log
pack
python3 benchmarks/bench_peers.py --phase model > $OUT/model.log 2>&1; echo "model rc=$?"; tail -4 $OUT/model.log
pack
for v in "q4 q4 q4" "q4e q4 source"; do set -- $v
  python3 -c "import sys,json; from tiered.layout.repack import repack; print(json.dumps(repack('/root/peers/ckpt', '/root/peers/layout-$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$?"; tail -c 300 $OUT/repack-$1.log; echo
pack
done
df -h /root | tail -1
wait
grep -v '^{' $OUT/quant_kernels.log | tail -40; tail -15 $OUT/cuda-tests.log
