#!/usr/bin/env bash
# Session 10, lease call A: the device step's background fill of free slots (--device-fill, 55f8500), never run on
# the GPU before. First its CUDA tests (test_devtable.py: the captured step with the fill stream against the host
# step), then the checkpoint and the q4+q4 repack, then issue 13's q4 offload at --vram-gb 4 with replayed routing:
# demand (lru/device) against fills of 4, 8 (32 and 64 copy programs) and 16 experts a step, with the warm-cache
# profile of lru/device and lru+fill8/device (the fill's cost when there is nothing left to fill).
source "$(dirname "$0")/lib.sh"
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py \
  > $OUT/cuda-tests-devtable.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests-devtable.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests-devtable.log | tail -8; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout-q4 q4 q4; pack
timeout 330 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout-q4 --text .carry/shared/text --docs 1 \
  --paced "" --device-fill "4,8,8:64,16" \
  --only "lru/device,lru+fill4/device,lru+fill8/device,lru+fill8:64/device,lru+fill16/device" \
  --profile "lru/device,lru+fill8/device" > $OUT/offload-layout-q4.log 2>&1
echo "offload q4 rc=$? $(el)"; grep -v '^{' $OUT/offload-layout-q4.log | grep -E "device|resident|fill" | tail -12
tail -1 $OUT/offload-layout-q4.log > $OUT/offload-layout-q4.json; pack
