#!/usr/bin/env bash
# Session 11, lease call E: the mailbox team leaves one core to the launching thread (call D: 16 spinning threads
# on 16 cores took lru+cpu/device from 468 to 355 tok/s while the team alone ran a 9.4 MB expert in 141 us at 15
# threads). The bf16 offload: lru/device, nextuse/device and both with CPU experts.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
timeout 220 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "" --device-fill "" --only "lru/device,nextuse/device,lru+cpu/device,nextuse+cpu/device" \
  --profile "lru+cpu/device" > $OUT/offload-bf16.log 2>&1
echo "offload bf16 rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16.log | tail -6
tail -1 $OUT/offload-bf16.log > $OUT/offload-bf16.json; pack
