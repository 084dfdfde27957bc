#!/usr/bin/env bash
# Session 21, call C: calls A and B measured the top-k inside resolve (4 warps) 2% slower than the two launches
# (softmax_topk runs 1 warp: shuffles only). Resolve's warps (TIERED_RESOLVE_WARPS) with the top-k in or out:
# q4+q4 at --vram-gb 4, replayed routing, 127 tokens, fresh processes, in an interleaved order.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
RUNS="default,default/tuned,lru/device,lru+fill7/device"
for t in off4:0:4 on1w:1:1 off1w:0:1 on2w:1:2 off4b:0:4 on1wb:1:1; do
  IFS=: read tag on nw <<< "$t"
  TIERED_TOPK_RESOLVE=$on TIERED_RESOLVE_WARPS=$nw TIMEOUT=150 LAYOUT=layout-q4 offload_variant $tag "$RUNS" \
    --device-fill 7 > /dev/null
  echo "$tag $(el)"; python3 benchmarks/lease/offload_summary.py $OUT/offload-layout-q4-$tag.json; pack
done
