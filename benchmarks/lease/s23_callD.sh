#!/usr/bin/env bash
# Session 23, call D (the box warm from call C): bf16 at --vram-gb 4 (its table the prefill fills: nothing planned,
# never complete), the default, one fresh process, and the q4+q4 default again in the same call (issue 13's q4/bf16
# offload ratio from one call).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=200 offload_variant bf16 "default" > /dev/null
echo "bf16 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-bf16.json; pack
peers_layout layout-q4 q4 q4
TIMEOUT=150 LAYOUT=layout-q4 offload_variant q4 "default" > /dev/null
echo "q4 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-q4.json; pack
