#!/usr/bin/env bash
# Session 52, call B (right after call A on the warm box: its checkpoint, layouts and llama.json under /root/peers):
# issue 12's offload at HEAD (bf16, --vram-gb 4, one eval document's replayed routing, llama.cpp's CPU-expert figure
# from call A): every option at its default, lru/device, lru+cpu/device and nextuse+pf1/device (the prefetch goal's
# run; last measured in session 12) in one fresh process; then the VRAM decode: --experts q4 alone (layout-q4e),
# q4+q4 with the lm_head on the Gluon GEMV (GLUON_LM: call A's best entry, if any), q4+q4 and bf16 again, q4e again;
# then the replayed step's timelines (q4+q4, bf16) at HEAD, the kernels' adds a token on this card.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
TIMEOUT=220 offload_variant default "default,lru/device,lru+cpu/device,nextuse+pf1/device" \
  --llama-json $W/llama.json --nextuse-prefetch 1
peers_vram q4e a
[ -n "${GLUON_LM:-}" ] && peers_vram q4 g "TIERED_QCONFIG=$GLUON_LM"
peers_vram q4 b
peers_vram bf16 b
peers_vram q4e b
[ -n "${GLUON_LM:-}" ] && peers_vram q4 g2 "TIERED_QCONFIG=$GLUON_LM"
decode_table
timelines q4 bf16
