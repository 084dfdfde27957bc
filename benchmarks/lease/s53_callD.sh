#!/usr/bin/env bash
# Session 53, call D (about 250 s, on call C's warm box): issue 13's offload ratio with --embed auto the default
# (which made the bf16 offload 1.2-1.3x faster): the q4+q4 layout, then the offload (--vram-gb 4, one eval
# document's replayed routing, every option at its default) on q4+q4 and on bf16, fresh processes, q4 / bf16 / q4.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_layout layout-q4 q4 q4
LAYOUT=layout-q4 TIMEOUT=90 offload_variant q4-a "default"
TIMEOUT=80 offload_variant bf16-a "default"
[ $(( $(date +%s) - T0 )) -lt 280 ] && LAYOUT=layout-q4 TIMEOUT=80 offload_variant q4-b "default"
true
