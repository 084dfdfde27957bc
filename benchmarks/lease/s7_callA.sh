#!/usr/bin/env bash
# Session 7, lease call A: issue 13's q4 decode in VRAM with the word tile (quant_moe algo 2). One checkpoint (the
# 8-layer 10.6B shape, seed 0) repacked bf16 and --experts q4 --dense q4 (and --experts q4 alone); the q4 kernel
# sweep (bench_quant_kernels.py --formats q4, which now includes algo 2), its fastest deterministic tiles applied
# to this copy's TUNED (tools/apply_tuned.py; the diff comes back as tuned.diff), then bench_peers' tiered VRAM
# decode of each layout one after the other, nothing beside them.
source "$(dirname "$0")/lib.sh"
W=/root/peers; mkdir -p $W
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 )) s"; }
python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 --device cuda \
  --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(el)"
for v in "layout source source" "layout-q4 q4 q4"; do set -- $v
  python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/$1', experts='$2', dense='$3', force=True, progress=False, quant_device='cuda')))" > $OUT/repack-$1.log 2>&1
  echo "repack $1 rc=$? $(el)"
done
timeout 200 python3 benchmarks/bench_quant_kernels.py --formats q4 > $OUT/sweep.log 2>&1; echo "sweep rc=$? $(el)"
grep -E "^ *\(|best|parts" $OUT/sweep.log | tail -20
python3 tools/apply_tuned.py $OUT/quant_kernels.json > $OUT/apply.log 2>&1; echo "apply rc=$?"; tail -c 1500 $OUT/apply.log
git diff tiered/kernels/quant_moe.py > $OUT/tuned.diff
pack
for v in q4 bf16; do
  timeout 100 python3 benchmarks/bench_peers.py --phase tiered --work $W --variant $v --tiered-only vram > $OUT/peers-$v.log 2>&1
  echo "tiered $v rc=$? $(el)"; grep -iE "decode|prefill" $OUT/peers-$v.log | grep -v '^{' | tail -3
  pack
done
cp $W/tiered*.json $OUT/ 2>/dev/null
