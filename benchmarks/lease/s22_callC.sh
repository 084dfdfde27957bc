#!/usr/bin/env bash
# Session 22, call C (cold box): the copy fill's default on a longer decode (511 tokens) against the gather fill auto
# in expert-id order; a timeline of the default at 127 tokens (its steps while the copies run and after); bf16, whose
# table the prefill fills (nothing to plan), the default against session 19-21's (CPU experts and the fill auto).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=200 LAYOUT=layout-q4 offload_variant long "default,lru+fillautoid/device" --device-fill auto/id \
  --new-tokens 512 > /dev/null
echo "long $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-long.json; pack
TIMEOUT=120 LAYOUT=layout-q4 offload_variant tl "default" --timeline default > /dev/null
echo "tl $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-tl.json; pack
peers_layout layout source source; pack
TIMEOUT=200 offload_variant bf16 "default,lru+cpu+fillauto/device" --device-fill auto > /dev/null
echo "bf16 $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-bf16-bf16.json; pack
