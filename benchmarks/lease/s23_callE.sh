#!/usr/bin/env bash
# Session 23, call E (cold box): call D's q4+q4 default ran 9% below calls A-C right after a bf16 process (its fill
# 9% slower too). Here both layouts are made first, then q4 (e1), bf16, q4 again (e2) and a q4 timeline (the steps
# after the bf16 process, step by step): whether the order explains it, and issue 13's q4/bf16 offload ratio from one
# call.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; peers_layout layout source source; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant e1 "default" > /dev/null
echo "e1 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-e1.json; pack
TIMEOUT=200 offload_variant bf16 "default" > /dev/null
echo "bf16 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-bf16.json; pack
TIMEOUT=150 LAYOUT=layout-q4 offload_variant e2 "default" > /dev/null
echo "e2 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-e2.json; pack
TIMEOUT=120 LAYOUT=layout-q4 offload_variant tl "default" --timeline default > /dev/null
echo "tl $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-tl.json; pack
