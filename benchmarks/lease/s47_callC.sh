#!/usr/bin/env bash
# Session 47, call C: where the replayed step's time goes, kernel by kernel (tools/profile_kernels.py --timeline:
# what each kernel adds to the token in the graph replays, with PDL), q4+q4 and bf16; then the router's softmax-top-k
# in the router's launch (TIERED_ROUTER=fused: the last program of each layer picks) against its own launch (the
# default), q4+q4 alternating fresh processes twice; and the dense GEMVs' L2 prefetch before the wait once.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layouts
for v in q4 bf16; do
  lay=layout-q4; [ $v = bf16 ] && lay=layout
  timeout 150 python3 tools/profile_kernels.py -m $W/$lay --tokens 16 --glue on --timeline > $OUT/timeline-$v.log 2>&1
  echo "timeline $v rc=$? $(el)"; grep -A40 "replayed" $OUT/timeline-$v.log | cut -c1-110 | head -30; pack
done
peers_vram q4 gemv
peers_vram q4 fused TIERED_ROUTER=fused
peers_vram q4 gemv2
peers_vram q4 fused2 TIERED_ROUTER=fused
peers_vram q4 l2pf TIERED_PDL_PREFETCH=1
decode_table
