#!/usr/bin/env bash
# Session 12, lease call I: the device step's whole issue-12 picture in one run at this commit (bf16, --vram-gb 4,
# replayed routing): demand (lru, nextuse), device prefetch (lru+pf8, nextuse+pf1: the prefetch goal's runs), CPU
# experts (lru+cpu, nextuse+cpu), and paced to 25 and 12 GB/s with and without CPU experts.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
timeout 420 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "25,12" --device-fill "" \
  --only "lru/device,nextuse/device,lru+pf8/device,nextuse+pf1/device,lru+cpu/device,nextuse+cpu/device,lru/device@25,lru+cpu/device@25,lru/device@12,lru+cpu/device@12,lru/off@12" \
  > $OUT/offload-bf16.log 2>&1
echo "offload bf16 rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16.log | tail -12
tail -1 $OUT/offload-bf16.log > $OUT/offload-bf16.json; pack
python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16.json').read())
print({k: d.get(k) for k in ('best_device_cpu', 'vs_serial_belady_bound_demand_device_cpu', 'vs_combined_bound_device',
       'vs_serial_belady_bound_prefetch_device', 'vs_serial_belady_bound_prefetch_nextuse', 'paced_device_cpu_over_off')})
for k, r in d['docs'][0]['runs'].items(): print(k, r.get('device_cpu'), r['cpu_experts'].get('gbps'))"
