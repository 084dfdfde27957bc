#!/usr/bin/env bash
# Session 12, lease call I: a miss split by FFN rows between the CPU and the link (--cpu-split auto: the CPU computes
# the first rows of one miss a layer, the gather copies the rest into the split row). CUDA tests of the mailbox (a
# forced row split among them), then the bf16 offload at --vram-gb 4 with replayed routing in one run: demand
# (lru, nextuse), CPU experts with the split and whole only (:whole = --cpu-split off), device prefetch (the prefetch
# goal's runs), and paced to 12 GB/s.
source "$(dirname "$0")/lib.sh"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_mailbox.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -4; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout source source; pack
timeout 400 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "12" --device-fill "" \
  --only "lru/device,nextuse/device,lru+cpu/device,lru+cpu:whole/device,nextuse+cpu/device,nextuse+cpu:whole/device,lru+pf8/device,nextuse+pf1/device,lru/device@12,lru+cpu/device@12" \
  > $OUT/offload-bf16.log 2>&1
echo "offload bf16 rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16.log | tail -12
tail -1 $OUT/offload-bf16.log > $OUT/offload-bf16.json; pack
python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16.json').read())
print({k: d.get(k) for k in ('best_device_cpu', 'vs_serial_belady_bound_demand_device_cpu', 'vs_combined_bound_device',
       'device_cpu_split_over_whole', 'vs_serial_belady_bound_prefetch_device', 'vs_serial_belady_bound_prefetch_nextuse',
       'paced_device_cpu_over_off')})
for k, r in d['docs'][0]['runs'].items(): print(k, round(r['decode_tok_s'], 1), r.get('device_cpu'), r['cpu_experts'].get('gbps'))"
