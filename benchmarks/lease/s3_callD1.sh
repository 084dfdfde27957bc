#!/usr/bin/env bash
# Session 3, lease call D1: the device step's prefetch on the 8-layer bf16 model (replayed routing, --vram-gb 4):
# lru/off (host), lru/device, lru+pf8/device; the device table's CUDA tests first.
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
[ -f $W/layout/manifest.json ] || python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/layout', force=True, progress=False)))" > $OUT/repack-layout.log 2>&1
echo "repack rc=$? $(( $(date +%s) - T0 )) s"
timeout 100 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py > $OUT/cuda-devtable.log 2>&1; echo "devtable tests rc=$?"; tail -3 $OUT/cuda-devtable.log
pack
timeout 260 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --llama-json benchmarks/results/llamacpp-2026-11-30-h200-s2.json \
  --text .carry/shared/text --only "lru/device,lru+pf8/device" --device-prefetch 8 --paced "" --docs 2 > $OUT/offload-pf.log 2>&1
echo "offload pf rc=$? $(( $(date +%s) - T0 )) s"; grep -v '^{' $OUT/offload-pf.log | tail -16
