#!/usr/bin/env bash
# Session 12, lease call J: the row split against whole experts only, each in a fresh process, whole first (call I
# ran the split first in one process and its later CPU runs were 2-3x slower: a run-order effect to rule out).
# bf16, --vram-gb 4, replayed routing.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; free -g | head -2; pack
for v in whole split; do
  only="lru+cpu:whole/device,nextuse+cpu:whole/device"
  [ $v = split ] && only="lru+cpu/device,nextuse+cpu/device"
  timeout 200 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
    --paced "" --device-fill "" --only "$only" > $OUT/offload-bf16-$v.log 2>&1
  echo "offload bf16 $v rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16-$v.log | tail -3
  tail -1 $OUT/offload-bf16-$v.log > $OUT/offload-bf16-$v.json; pack
  python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16-$v.json').read())
for k, r in d['docs'][0]['runs'].items(): print(k, round(r['decode_tok_s'], 1), round(r['hit_rate'], 3), r.get('device_cpu'), r['cpu_experts'].get('gbps'))"
  free -g | head -2
done
