#!/usr/bin/env bash
# Session 22, call D (cold box): the copy fill's first batch alone before the decode's first step (the rest after its
# launch; call B's timeline had the first step at 2.25 ms). q4+q4 at --vram-gb 4, replayed routing, 127 tokens, two
# fresh processes: the default (copy, expert-id order), on a tuned layout, and the gather fill auto in id order; then
# a timeline of the default.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
RUNS="default,default/tuned,lru+fillautoid/device"
for i in 1 2; do
  TIMEOUT=200 LAYOUT=layout-q4 offload_variant d$i "$RUNS" --device-fill auto/id > /dev/null
  echo "d$i $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-d$i.json; pack
done
TIMEOUT=120 LAYOUT=layout-q4 offload_variant tl "default" --timeline default > /dev/null
echo "tl $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-tl.json
python3 -c "
import json; d = json.loads(open('$OUT/offload-layout-q4-tl.json').read().strip().splitlines()[-1])
t = d['docs'][0]['runs']['default']['timeline']; print('first steps us', t['step_us'][:6])"
pack
