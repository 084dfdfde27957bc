#!/usr/bin/env bash
# Session 7, lease call D: `--experts q4` alone (dense bf16) with the word tile, beside bf16 on the same checkpoint
# (qwen3-10b-8l, seed 0), tiered VRAM decode one after the other; then the CUDA tests of the CPU-expert path
# (last run on the GPU at 1b8edd5).
source "$(dirname "$0")/lib.sh"
W=/root/peers; mkdir -p $W
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
[ -f $W/ckpt/config.json ] || python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 \
  --device cuda --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(el)"
for v in "layout source source" "layout-q4e q4 source"; do set -- $v
  [ -f $W/$1/manifest.json ] || python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(el)"
done
for v in q4e bf16; do
  timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "tiered $v rc=$? $(el)"; grep -iE "decode|prefill" $OUT/peers-$v.log | grep -v '^{' | tail -3
  cp $W/tiered*.json $OUT/ 2>/dev/null; pack
done
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_experts.py \
   > $OUT/cuda-cpu-experts-tests.log 2>&1; echo "tests rc=$? $(el)"; tail -3 $OUT/cuda-cpu-experts-tests.log
