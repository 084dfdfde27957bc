#!/usr/bin/env bash
# Session 6, lease call B: issue 13's missing row, `--experts q4` alone (dense bf16) in VRAM, beside bf16 and
# `--experts q4 --dense q4` on the same checkpoint in the same call (the 8-layer 10.6B shape); the CUDA suite of
# the quantized kernels (the 3c24556 refactor on the GPU for the first time) runs beside the checkpoint and the
# repacks, and nothing timed runs beside it.
source "$(dirname "$0")/lib.sh"
W=/root/peers; mkdir -p $W
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
(timeout 330 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short --durations=5 tests/test_quant_kernels.py \
   > $OUT/cuda-quant-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-quant-tests.log) &
TESTS=$!
python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 --device cuda \
  --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(el)"
for v in "layout source source" "layout-q4e q4 source" "layout-q4 q4 q4"; do set -- $v
  python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(el)"
done
wait $TESTS; tail -12 $OUT/cuda-quant-tests.log; echo "tests done $(el)"
pack
for v in bf16 q4e q4; do
  timeout 90 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "tiered $v rc=$? $(el)"; grep -iE "decode|prefill" $OUT/peers-$v.log | grep -v '^{' | tail -3
done
cp $W/tiered*.json $OUT/ 2>/dev/null
