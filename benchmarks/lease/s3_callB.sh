#!/usr/bin/env bash
# Session 3, lease call B: the 8-layer 10.6B-shape model (bf16; q4 experts; q4 experts + q4 dense) under /root/peers,
# the device slot table's CUDA tests, and offloaded decode with routing replayed: host step vs device step (bf16 and
# q4 experts). llama.cpp is not rebuilt in this lease: its figures come from the s2 lease on the same checkpoint
# (same preset and seed: bit-identical weights), benchmarks/results/llamacpp-2026-11-30-h200-s2.json.
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
for v in "layout source source" "layout-q4e q4 source" "layout-q4 q4 q4"; do set -- $v
  [ -f $W/$1/manifest.json ] || python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(( $(date +%s) - T0 )) s"
done
pack
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py > $OUT/cuda-devtable.log 2>&1; echo "devtable tests rc=$?"; tail -3 $OUT/cuda-devtable.log
pack
LJ=benchmarks/results/llamacpp-2026-11-30-h200-s2.json
timeout 260 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --llama-json $LJ --text .carry/shared/text \
  --only "lru/device,flru/device,predicted/off" --paced "" --docs 2 > $OUT/offload-bf16.log 2>&1; echo "offload bf16 rc=$? $(( $(date +%s) - T0 )) s"
mv $OUT/offload_cpu_experts.json $OUT/offload-bf16.json 2>/dev/null
grep -v '^{' $OUT/offload-bf16.log | tail -14
pack
timeout 150 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout-q4e --llama-json $LJ --text .carry/shared/text \
  --only "lru/device,flru/device" --paced "" --docs 2 > $OUT/offload-q4e.log 2>&1; echo "offload q4e rc=$? $(( $(date +%s) - T0 )) s"
mv $OUT/offload_cpu_experts.json $OUT/offload-q4e.json 2>/dev/null
grep -v '^{' $OUT/offload-q4e.log | tail -10
df -h /root | tail -1
