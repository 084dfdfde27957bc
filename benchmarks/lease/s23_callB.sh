#!/usr/bin/env bash
# Session 23, call B (the box warm from call A: its checkpoint and q4 layout under /root/peers): the second pair of
# fresh processes (on2, off2: the default and default/tuned, 127 tokens), a 511-token pair (the default with and
# without the complete steps), then a timeline of the default (the steps after the fill are the complete ones).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
RUNS="default,default/tuned"
TIERED_COMPLETE_STEP=0 TIMEOUT=150 LAYOUT=layout-q4 offload_variant off2 "$RUNS" > /dev/null
echo "off2 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-off2.json; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant on2 "$RUNS" > /dev/null
echo "on2 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-on2.json; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant long "default" --new-tokens 512 > /dev/null
echo "long $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-long.json; pack
TIERED_COMPLETE_STEP=0 TIMEOUT=150 LAYOUT=layout-q4 offload_variant longoff "default" --new-tokens 512 > /dev/null
echo "longoff $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-longoff.json; pack
TIMEOUT=120 LAYOUT=layout-q4 offload_variant tl "default" --timeline default > /dev/null
echo "tl $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-tl.json
python3 -c "
import json; d = json.loads(open('$OUT/offload-layout-q4-tl.json').read().strip().splitlines()[-1])
t = d['docs'][0]['runs']['default']['timeline']; print('first steps us', t['step_us'][:6], 'last', t['step_us'][-6:])"
pack
