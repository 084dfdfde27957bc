#!/usr/bin/env bash
# Session 25, call D: why a VRAM prefill is host-bound (call C: kernels 15-17% of the wall): cProfile over one warm
# 512-token prefill (tools/profile_prefill_host.py) of a random qwen3-mini (16 layers, 128 experts top-8, tiny
# widths: the host's work per layer without the 10.6B kernels), q4+q4 and bf16; then the split-K CUDA tests at
# MAX_ROWS 2 (qlinear at 3 rows now takes quant_matmul).
source "$(dirname "$0")/lib.sh"
M=/root/mini; [ -f $M/ckpt/config.json ] || python3 tools/make_random_checkpoint.py --preset qwen3-mini --out $M/ckpt \
  --seed 0 --device cuda > $OUT/make-mini.log 2>&1; echo "make rc=$? $(el)"
for v in q4 bf16; do
  e=q4; [ $v = bf16 ] && e=source
  [ -f $M/lay-$v/manifest.json ] || python3 -c "from tiered.layout.repack import repack; repack('$M/ckpt', '$M/lay-$v', experts='$e', dense='$e', force=True, progress=False, quant_device='cuda')" > $OUT/repack-$v.log 2>&1
  timeout 120 python3 tools/profile_prefill_host.py -m $M/lay-$v --tokens 512 --top 40 > $OUT/host-$v.log 2>&1
  echo "host $v rc=$? $(el)"; head -3 $OUT/host-$v.log; grep -A28 "by tottime" $OUT/host-$v.log; pack
done
