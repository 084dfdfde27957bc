#!/usr/bin/env bash
# Session 52, call C: calls A and B in one call without llama.cpp (the device refused starts; a build costs ~240 s).
# The peers checkpoint and its layouts (q4+q4, bf16, --experts q4 alone); the Gluon q4 GEMV against TUNED's word tile
# at the lm_head on this card (BN 64/128, 2/4 steps a load, 2/4 groups a step: sessions 44-45's best on an H100);
# issue 12's offload at HEAD (bf16, --vram-gb 4, one eval document's replayed routing: default, lru/device,
# lru+cpu/device, nextuse+pf1/device; the bounds are measured in the same run); the VRAM decode q4+q4 / bf16 / q4e
# / q4+q4 (with the probe's lm_head entry when it beat TUNED) / bf16; the timelines if time is left.
# Each later step is skipped past its time guard.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt
peers_layout layout-q4 q4 q4
peers_layout layout source source
peers_layout layout-q4e q4 source
pack
gluon_lm 100
TIMEOUT=200 offload_variant default "default,lru/device,lru+cpu/device,nextuse+pf1/device" --nextuse-prefetch 1
peers_vram q4 a
peers_vram bf16 a
[ $(( $(date +%s) - T0 )) -lt 400 ] && peers_vram q4e a
[ -n "$GL" ] && [ $(( $(date +%s) - T0 )) -lt 430 ] && peers_vram q4 g "TIERED_QCONFIG=$GL"
[ $(( $(date +%s) - T0 )) -lt 400 ] && peers_vram q4 b
[ $(( $(date +%s) - T0 )) -lt 420 ] && peers_vram bf16 b
decode_table
[ $(( $(date +%s) - T0 )) -lt 420 ] && timelines q4
true
