#!/usr/bin/env bash
# Session 53, call E (about 200-320 s, a fresh box): where the bf16 offload's token goes with the table in pinned RAM
# (--embed auto, the default): lru/device and lru+cpu/device (the demand goal's run) at --vram-gb 4 on one eval
# document's replayed routing, each profiled after its timed run (--profile: the same steps on the warm cache, their
# wall time without misses and the kernels a token, under torch.profiler). Call A measured
# compute 0.756 + copies 0.772 = 1.53 ms against 2.06 for lru/device: this is the 0.53 ms. First the slot-table
# kernels alone (bench_slot_table.py: the gather's GB/s at 1-4 and 8 programs a SM); the offload JSON's runs now
# carry the slot table's gather_gbps (timed at the hand-over), and their copy_busy comes from it.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
# gather_gbps and the batch steps with the table in RAM (built after session 53's lease, not yet run on a GPU)
cuda_tests 120 tests/test_embed_host.py tests/test_devtable.py -k "device_step_matches_host_step or embed_host"
# the gather's own GB/s over UVA on this card at other load shapes, beside the copy engine's for the same bytes
timeout 100 python3 benchmarks/bench_slot_table.py --ctas 132,264,528,1056 \
  --shapes 4:1024:4,8:1024:4,2:1024:4,4:2048:2,8:2048:4,4:512:8 > $OUT/slot_table.log 2>&1
echo "slot_table rc=$? $(el)"; grep -E "bf16 new .*(miss_gbps|copy_engine)" $OUT/slot_table.log | head -24; pack
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=200 offload_variant profile "lru/device,lru+cpu/device" --profile lru/device,lru+cpu/device
# the bf16 gather's fastest load shape at one block (bench_slot_table above); when it beats the default (4:1024:4) by
# 5% or more, lru/device and lru+cpu/device again with it (TIERED_GATHER), then without, fresh processes
GS=$(python3 -c "
import json; r = json.load(open('$OUT/slot_table.json'))['shapes']['bf16']['new']
k = {key.split('gbps_')[1]: v for key, v in r.items() if key.startswith('gather_1miss_gbps_w')}  # w4_b1024_c4
best = max(k, key=k.get); d = k.get('w4_b1024_c4')
print(':'.join(x[1:] for x in best.split('_')) if d and k[best] >= 1.05 * d else '')" 2>/dev/null)
echo "best gather shape: ${GS:-default}"
if [ -n "$GS" ] && [ $(( $(date +%s) - T0 )) -lt 360 ]; then
  TIMEOUT=100 TIERED_GATHER=$GS offload_variant gather-shape "lru/device,lru+cpu/device"
  TIMEOUT=100 offload_variant gather-default "lru/device,lru+cpu/device"
fi
true
