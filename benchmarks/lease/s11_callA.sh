#!/usr/bin/env bash
# Session 11, lease call A: CPU experts inside the device step (model/cpu_mailbox.py, kernels/cpu_handoff.py).
# The CUDA tests of the mailbox and of the device table first; then the bf16 offload at --vram-gb 4 with replayed
# routing: lru/device and nextuse/device against the same with --cpu-experts auto (the cost model's split), with a
# warm-cache profile of nextuse+cpu/device.
source "$(dirname "$0")/lib.sh"
timeout 220 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_mailbox.py tests/test_devtable.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -8; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout source source; pack
timeout 260 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "" --device-fill "" --only "lru/device,nextuse/device,lru+cpu/device,nextuse+cpu/device" \
  --profile "nextuse+cpu/device" > $OUT/offload-bf16.log 2>&1
echo "offload bf16 rc=$? $(el)"; grep -E "^csv|device" $OUT/offload-bf16.log | grep -v '^{' | tail -12
tail -1 $OUT/offload-bf16.log > $OUT/offload-bf16.json; pack
