#!/usr/bin/env bash
# Session 10, lease call D: the hand-over to the device table without its per-key Python loop (take(): 1.7 ->
# 0.4 ms on the CPU box for 512 keys; it runs once per generate, inside the first decode step). The q4 offload at
# --vram-gb 4, replayed routing: lru/device against lru+fill8/device with their warm-cache profiles; then bf16
# lru/device and nextuse/device (issue 12's demand figures on the same box).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
off() {  # LAYOUT TAG RUNS FILLS PROFILE
  timeout 200 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/$1 --text .carry/shared/text --docs 1 \
    --paced "" --device-fill "$4" --only "$3" --profile "$5" > $OUT/offload-$2.log 2>&1
  echo "offload $2 rc=$? $(el)"; grep -E "^csv" $OUT/offload-$2.log
  tail -1 $OUT/offload-$2.log > $OUT/offload-$2.json; pack
}
off layout-q4 q4 "lru/device,lru+fill8/device" "8" "lru/device,lru+fill8/device"
peers_layout layout source source
off layout bf16 "lru/device,nextuse/device" "" ""
