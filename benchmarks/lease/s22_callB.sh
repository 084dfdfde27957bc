#!/usr/bin/env bash
# Session 22, call B (cold box): --device-fill copy made the default. q4+q4 at --vram-gb 4, replayed routing, 127
# tokens, two fresh processes: the default (copy, expert-id order: an untuned layout), the default on a tuned layout
# (popularity order), session 19-21's default (the gather fill auto, in either order) and a fixed 7; then a timeline
# of the default (each step's time, the blocks entered and the misses; a few us a step of its own).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
RUNS="default,default/tuned,lru+fillauto/device,lru+fillautoid/device,lru+fill7/device"
for i in 1 2; do
  TIMEOUT=200 LAYOUT=layout-q4 offload_variant b$i "$RUNS" --device-fill auto,auto/id,7 > /dev/null
  echo "b$i $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-b$i.json; pack
done
TIMEOUT=120 LAYOUT=layout-q4 offload_variant tl "default" --timeline default > /dev/null
echo "tl $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-tl.json; pack
