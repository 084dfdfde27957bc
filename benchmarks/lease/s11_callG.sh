#!/usr/bin/env bash
# Session 11, lease call G (written after the device was refused; for the next session, after call F): --h2d-gbps
# inside the device step (the gather kernel paces itself): the CUDA test of the paced gather, then the bf16 offload
# at 25 and 12 GB/s, lru/device against lru+cpu/device (issue 12's 1.5x at 12 GB/s, paced_device_cpu_over_off).
source "$(dirname "$0")/lib.sh"
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_devtable.py -k paced \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -4; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout source source; pack
timeout 300 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "25,12" --device-fill "" \
  --only "lru/device@25,lru+cpu/device@25,lru/device@12,lru+cpu/device@12,lru/off@12,lru/auto@12" \
  > $OUT/offload-bf16-paced.log 2>&1
echo "offload bf16 paced rc=$? $(el)"; grep -E "^csv|paced_device" $OUT/offload-bf16-paced.log | tail -8
tail -1 $OUT/offload-bf16-paced.log > $OUT/offload-bf16-paced.json; pack
