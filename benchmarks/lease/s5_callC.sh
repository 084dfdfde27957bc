#!/usr/bin/env bash
# Session 5, lease call C (right after B, on the warm box: /root/peers holds the layouts, llama.json the same
# lease's llama.cpp figures): the q4/q8 decode-kernel sweep with the flat tile (bench_quant_kernels.py), its fastest
# deterministic tiles applied to TUNED (tools/apply_tuned.py, the same lines are committed afterwards), tiered's q4
# VRAM decode again with them; then the offload runs of issue 12 on the bf16 layout (one eval document, replayed
# routing, --vram-gb 4): CPU experts all / auto / off, native and paced to 25 and 12 GB/s, next-use device step.
# A cold box (B's files gone) makes the bf16 layout again and skips what needs the rest.
source "$(dirname "$0")/lib.sh"
W=/root/peers; mkdir -p $W
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
WARM=1; [ -f $W/layout-q4/manifest.json ] && [ -f $W/llama.json ] || WARM=0
echo "warm=$WARM"
if [ $WARM = 0 ]; then
  python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 --device cuda \
    --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(el)"
  python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/layout', experts='source', dense='source', force=True, progress=False)))" > $OUT/repack.log 2>&1
  echo "repack rc=$? $(el)"; rm -rf $W/ckpt
fi
timeout 170 python3 benchmarks/bench_quant_kernels.py --formats q4,q8 --max-seconds 120 > $OUT/quant-kernels.log 2>&1
echo "sweep rc=$? $(el)"; grep -iE "tuned|QConfig" $OUT/quant-kernels.log | tail -14
python3 tools/apply_tuned.py $OUT/quant_kernels.json > $OUT/applied.log 2>&1; echo "apply rc=$?"; cat $OUT/applied.log | head -14
pack
if [ $WARM = 1 ]; then
  mv $W/tiered-q4.json $W/tiered-q4-default.json 2>/dev/null
  timeout 75 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant q4 --tiered-only vram > $OUT/peers-q4-tuned.log 2>&1
  echo "tiered q4 tuned rc=$? $(el)"; grep -i "decode tok/s" $OUT/peers-q4-tuned.log | tail -1
  cp $W/tiered-q4.json $OUT/tiered-q4-tuned.json 2>/dev/null
  python3 benchmarks/bench_peers.py --phase report --work $W --results-dir $OUT > $OUT/report-tuned.log 2>&1
fi
pack
LJ=$W/llama.json; [ -f $LJ ] || LJ=benchmarks/results/llamacpp-2026-11-30-h200-s2.json
P=predicted+4
timeout $(( 470 - ($(date +%s) - T0) )) python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --llama-json $LJ \
  --text .carry/shared/text --docs 1 --paced 25,12 \
  --only "all,predicted/off,$P/off,$P/auto,$P/off@25,$P/auto@25,$P/off@12,$P/auto@12,nextuse/device" > $OUT/offload-bf16.log 2>&1
echo "offload rc=$? $(el)"; grep -v '^{' $OUT/offload-bf16.log | tail -26
