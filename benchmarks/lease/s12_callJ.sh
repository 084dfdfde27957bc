#!/usr/bin/env bash
# Session 12, lease call J: the row split against whole experts only, in one run, whole first (call I ran the split
# first and its later CPU runs were 2-3x slower: a run-order effect to rule out). bf16, --vram-gb 4, replayed routing.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
timeout 300 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
  --paced "" --device-fill "" \
  --only "lru+cpu:whole/device,nextuse+cpu:whole/device,lru+cpu/device,nextuse+cpu/device" \
  > $OUT/offload-bf16.log 2>&1
echo "offload bf16 rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16.log | tail -6
tail -1 $OUT/offload-bf16.log > $OUT/offload-bf16.json; pack
python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16.json').read())
print({k: d.get(k) for k in ('best_device_cpu', 'vs_serial_belady_bound_demand_device_cpu', 'device_cpu_split_over_whole')})
for k, r in d['docs'][0]['runs'].items(): print(k, round(r['decode_tok_s'], 1), round(r['hit_rate'], 3), r.get('device_cpu'), r['cpu_experts'].get('gbps'))"
free -g | head -2
