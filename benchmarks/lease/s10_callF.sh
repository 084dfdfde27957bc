#!/usr/bin/env bash
# Session 10, lease call F: the background fill where the q4 table cannot hold every expert (--vram-gb 3 and 2.5:
# fewer slots than the 1,024 experts), against demand paging: does filling the free slots after the prefill help,
# or do its cold blocks only crowd the link? lru/device against lru+fill8/device, replayed routing.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
for gb in 3 2.5; do
  timeout 170 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout-q4 --text .carry/shared/text --docs 1 \
    --paced "" --vram-gb $gb --device-fill 8 --only "lru/device,lru+fill8/device" > $OUT/offload-q4-$gb.log 2>&1
  echo "offload q4 $gb GB rc=$? $(el)"; grep -E "^csv|expert slots" $OUT/offload-q4-$gb.log | tail -4
  tail -1 $OUT/offload-q4-$gb.log > $OUT/offload-q4-$gb.json; pack
done
