#!/usr/bin/env bash
# Written in session 12 for the next lease (not yet run): --cpu-split admit on the GPU. CUDA tests of the mailbox
# (a forced admitted split among them: fp32 tokens identical to the host step), then bf16 at --vram-gb 4 with
# replayed routing, whole experts and the admitted split, each variant in a fresh process (session 12 call I: CPU
# runs late in one process ran 2-3x slower). The simulator (sim_devtable.py --split-admit 0.6, fit/) puts
# nextuse+cpu at 0.831 of serial Belady against 0.759 whole.
source "$(dirname "$0")/lib.sh"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider --tb=short tests/test_cpu_mailbox.py \
  > $OUT/cuda-tests.log 2>&1; echo "rc=$?" >> $OUT/cuda-tests.log
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/cuda-tests.log | tail -4; echo "tests done $(el)"; pack
peers_ckpt; peers_layout layout source source; pack
for v in whole admit; do
  only="lru+cpu/device,nextuse+cpu/device"
  [ $v = admit ] && only="lru+cpu:admit/device,nextuse+cpu:admit/device"
  timeout 200 python3 benchmarks/bench_cpu_experts_gpu.py --layout $W/layout --text .carry/shared/text --docs 1 \
    --paced "" --device-fill "" --only "$only" > $OUT/offload-bf16-$v.log 2>&1
  echo "offload bf16 $v rc=$? $(el)"; grep -E "^csv" $OUT/offload-bf16-$v.log | tail -3
  tail -1 $OUT/offload-bf16-$v.log > $OUT/offload-bf16-$v.json; pack
  python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16-$v.json').read())
for k, r in d['docs'][0]['runs'].items(): print(k, round(r['decode_tok_s'], 1), round(r['hit_rate'], 3), r.get('vs_serial_belady_bound'), r.get('device_cpu'))"
done
