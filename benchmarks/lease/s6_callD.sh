#!/usr/bin/env bash
# Session 6, lease call D: issue 12's slow-link goal with demand paging alone: --cpu-experts auto against off at
# --h2d-gbps 25 and 12 (lru, no prefetch copies on the paced link), and `all` for the CPU-expert rate; the 8-layer
# 10.6B-shape bf16 model at --vram-gb 4, one replayed document. Ran three times: D1 (ea2f46e, with `all`), D2 (3460a14,
# with `all`) and D3 (93a8477, where write-behind was on by default: its "lru/auto" is today's "lru/auto+wb" and its
# "lru/auto-nowb" today's "lru/auto"); the labels below are today's.
source "$(dirname "$0")/lib.sh"
W=/root/peers; mkdir -p $W
T0=$(date +%s)
python3 tools/make_random_checkpoint.py --preset qwen3-10b-8l --out $W/ckpt --seed 0 --device cuda \
  --tokenizer tiered/data/olmoe-code-17m > $OUT/make.log 2>&1; echo "make rc=$? $(( $(date +%s) - T0 )) s"
python3 -c "import json; from tiered.layout.repack import repack; print(json.dumps(repack('$W/ckpt', '$W/layout', experts='source', dense='source', force=True, progress=False)))" > $OUT/repack.log 2>&1
echo "repack rc=$? $(( $(date +%s) - T0 )) s"
timeout 330 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced 25,12 --only "lru/off@25,lru/auto@25,lru/auto+wb@25,lru/off@12,lru/auto@12,lru/auto+wb@12" > $OUT/bench.log 2>&1
echo "bench rc=$? $(( $(date +%s) - T0 )) s"; grep -v '^{' $OUT/bench.log | tail -22
