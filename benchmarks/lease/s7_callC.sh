#!/usr/bin/env bash
# Session 7, lease call C: issue 13's offload figures with the word tile: q4+q4 and bf16 at --vram-gb 4 with the
# replayed reference routing of one eval document (bench_cpu_experts_gpu.py: lru with the host step, lru and
# nextuse with the device step), as session 5's calls E and F ran them; same checkpoint (qwen3-10b-8l, seed 0).
source "$(dirname "$0")/lib.sh"
peers_ckpt
peers_layout layout source source
peers_layout layout-q4 q4 q4
for v in layout-q4 layout; do
  timeout 150 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/$v --text .carry/shared/text --docs 1 --paced "" \
    --only "lru/off,lru/device,nextuse/device" > $OUT/offload-$v.log 2>&1
  echo "offload $v rc=$? $(el)"; grep -v '^{' $OUT/offload-$v.log | tail -8
  tail -1 $OUT/offload-$v.log > $OUT/offload-$v.json; pack
done
