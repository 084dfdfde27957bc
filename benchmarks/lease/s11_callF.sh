#!/usr/bin/env bash
# Session 11, lease call F: the split's costs from the device-side probe (post and wait kernels timed with events:
# the round trip beyond the compute, and the worker's rate times 0.85 for the gather beside it), and the worker
# that starts from the last number answered. The CUDA tests of the mailbox; the bf16 offload: lru/device,
# nextuse/device and both with CPU experts (sim_devtable.py: nextuse+cpu ahead of lru+cpu when a lone miss is copied).
source "$(dirname "$0")/lib.sh"
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_mailbox.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -4; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout source source; pack
timeout 220 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "" --device-fill "" --only "lru/device,nextuse/device,lru+cpu/device,nextuse+cpu/device" \
  > $OUT/offload-bf16.log 2>&1
echo "offload bf16 rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16.log | tail -6
tail -1 $OUT/offload-bf16.log > $OUT/offload-bf16.json; pack
python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16.json').read())
for k, r in d['docs'][0]['runs'].items(): print(k, r.get('device_cpu'), r['cpu_experts'].get('gbps'))"
