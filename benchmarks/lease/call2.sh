#!/usr/bin/env bash
# Lease call 2: llama.cpp's runs (GPU 0, alone on that GPU), then the same decode at three source trees
# (old 208579b, house 3945841, main) on the old-written layout. On a second GPU meanwhile: the Qwen3.5 benchmark.
set -u
export PYTHONUNBUFFERED=1
NG=$(nvidia-smi -L | wc -l)
if [ "$NG" -gt 1 ] && [ -d .carry/fam35 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  (cd .carry/fam35 && PYTHONPATH=/tmp/site CUDA_VISIBLE_DEVICES=1 timeout 560 python3 benchmarks/bench_qwen35_gpu.py > $OUT/qwen35.log 2>&1;
   echo "rc=$?" >> $OUT/qwen35.log) &
fi
export CUDA_VISIBLE_DEVICES=0
python3 benchmarks/bench_peers.py --phase llama > $OUT/llama.log 2>&1; echo "llama rc=$?"; tail -25 $OUT/llama.log
cp /root/peers/llama.json $OUT/ 2>/dev/null
python3 benchmarks/bench_trees_gpu.py --layout /root/peers/layout-old --tree old=.carry/old --tree house=.carry/house \
  --tree main=. --repeats 2 --expect-identical house > $OUT/trees.log 2>&1; echo "trees rc=$?"; tail -6 $OUT/trees.log
timeout 200 python3 -m pytest -q --tb=short -m cuda -p no:cacheprovider --continue-on-collection-errors \
  tests/test_attention_kernel.py tests/test_attention_decode.py > $OUT/cuda-attn.log 2>&1; echo "attn tests rc=$?"
tail -15 $OUT/cuda-attn.log
wait
tail -15 $OUT/qwen35.log 2>/dev/null
