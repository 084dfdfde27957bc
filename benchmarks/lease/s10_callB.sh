#!/usr/bin/env bash
# Session 10, lease call B: the background fill with its host watch (the steps switch to graphs without the fill
# once it has run dry) and its order by fitted popularity. CUDA tests of test_devtable.py; then the q4 offload at
# --vram-gb 4 with replayed routing: demand (lru/device) against fills of 6 and 8 a step, with the warm-cache
# profile of lru/device and lru+fill8/device (the fill has run dry there: the idle graphs' cost); then the bf16
# offload, whose 243 slots the prefill fills: lru/device against lru+fill2/device (the fill finds nothing).
source "$(dirname "$0")/lib.sh"
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py \
  > $OUT/cuda-tests-devtable.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests-devtable.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests-devtable.log | tail -8; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
off() {  # LAYOUT TAG RUNS FILLS PROFILE
  timeout 240 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/$1 --text .carry/shared/text --docs 1 \
    --paced "" --device-fill "$4" --only "$3" --profile "$5" > $OUT/offload-$2.log 2>&1
  echo "offload $2 rc=$? $(el)"; grep -v '^{' $OUT/offload-$2.log | grep -E "device|fill" | tail -8
  tail -1 $OUT/offload-$2.log > $OUT/offload-$2.json; pack
}
off layout-q4 q4 "lru/device,lru+fill6/device,lru+fill8/device" "6,8" "lru/device,lru+fill8/device"
peers_layout layout source source
off layout bf16 "lru/device,lru+fill2/device" "2" ""
