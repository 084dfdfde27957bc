#!/usr/bin/env bash
# Session 10, lease call C: the q4 offload with the background fill again, twice (repeatability), and its
# warm-cache profile in three passes (the fill graphs until the host watch sees it dry; under the profiler; the
# graphs without the fill from the first step), against lru/device; plus the fill in expert-id order.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
for rep in 1 2; do
  timeout 200 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout-q4 --text .carry/shared/text --docs 1 \
    --paced "" --device-fill "8,8/id" --only "lru/device,lru+fill8/device,lru+fill8id/device" \
    --profile "lru/device,lru+fill8/device" > $OUT/offload-q4-$rep.log 2>&1
  echo "offload q4 $rep rc=$? $(el)"; grep -E "^csv" $OUT/offload-q4-$rep.log
  tail -1 $OUT/offload-q4-$rep.log > $OUT/offload-q4-$rep.json; pack
done
