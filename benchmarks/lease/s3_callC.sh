#!/usr/bin/env bash
# Session 3, lease call C: the 8-layer 10.6B-shape model again (bf16; q4 experts; q4 experts + q4 dense), the device
# slot table's CUDA tests, VRAM decode of bf16 and q4+q4 (bench_peers --phase tiered), and offloaded decode with
# routing replayed, host step vs device step, for bf16 and q4+q4. llama.cpp figures: the s2 lease on the same
# checkpoint (same preset and seed), benchmarks/results/llamacpp-2026-11-30-h200-s2.json.
set -u
export PYTHONUNBUFFERED=1
BACK=$OUT; R=/root/res_$(basename "$0" .sh); mkdir -p $R; export OUT=$R
pack() { tar czf $BACK/$(basename "$0" .sh).tgz -C $R . 2>/dev/null; }
trap pack EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site
W=/root/peers; mkdir -p $W
T0=$(date +%s)
[ -f $W/ckpt/config.json ] || python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 --device cuda \
  --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(( $(date +%s) - T0 )) s"
for v in "layout source source" "layout-q4 q4 q4"; do set -- $v
  [ -f $W/$1/manifest.json ] || python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(( $(date +%s) - T0 )) s"
done
pack
timeout 100 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py > $OUT/cuda-devtable.log 2>&1; echo "devtable tests rc=$?"; tail -3 $OUT/cuda-devtable.log
pack
for v in bf16 q4; do
  timeout 120 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "peers tiered $v rc=$? $(( $(date +%s) - T0 )) s"; grep -i "decode tok/s\|prefill" $OUT/peers-$v.log | tail -3
done
cp $W/tiered*.json $OUT/ 2>/dev/null
pack
LJ=benchmarks/results/llamacpp-2026-11-30-h200-s2.json
for v in "layout bf16" "layout-q4 q4"; do set -- $v
  timeout 170 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/$1 --llama-json $LJ --text .carry/shared/text \
    --only "lru/device,flru/device" --paced "" --docs 2 > $OUT/offload-$2.log 2>&1; echo "offload $2 rc=$? $(( $(date +%s) - T0 )) s"
  mv $OUT/offload_cpu_experts.json $OUT/offload-$2.json 2>/dev/null
  grep -v '^{' $OUT/offload-$2.log | tail -9
  pack
done
