#!/usr/bin/env bash
# Session 7, lease call D: `--experts q4` alone (dense bf16) with the word tile, beside bf16 on the same checkpoint
# (qwen3-10b-8l, seed 0), tiered VRAM decode one after the other; then the CUDA tests of the CPU-expert path
# (last run on the GPU at 1b8edd5).
source "$(dirname "$0")/lib.sh"
peers_ckpt
peers_layout layout source source
peers_layout layout-q4e q4 source
for v in q4e bf16; do
  timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "tiered $v rc=$? $(el)"; grep -iE "decode|prefill" $OUT/peers-$v.log | grep -v '^{' | tail -3
  cp $W/tiered*.json $OUT/ 2>/dev/null; pack
done
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_experts.py \
   > $OUT/cuda-cpu-experts-tests.log 2>&1; echo "tests rc=$? $(el)"; tail -3 $OUT/cuda-cpu-experts-tests.log
