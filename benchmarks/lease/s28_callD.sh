#!/usr/bin/env bash
# Session 28, call D (prepared, not run: refused for lack of device time; needs a warm box with the peers layouts):
# our batch decode with and without steps ahead (serial runs first in the process, then graphs: the default), B = 8
# at the GEMV/grouped cut-over of 4 and 8 tokens (TIERED_DECODE_MAX_T), then sampled rows (temperature 0.8, top-p
# 0.95, drawn on the device) with and without steps ahead.
source "$(dirname "$0")/lib.sh"
[ -f $W/layout-q4/manifest.json ] && [ -f $W/layout/manifest.json ] || { echo "cold box: no layouts"; exit 3; }
BATCH_TIMEOUT=70 batch_vram q4 layout-q4 1,8,32,128 graphs,serial
BATCH_TIMEOUT=70 batch_vram bf16 layout 1,8,32,128 graphs,serial
BATCH_TIMEOUT=70 batch_vram q4-t4 layout-q4 8 graphs TIERED_DECODE_MAX_T=4
BATCH_TIMEOUT=70 batch_vram bf16-t4 layout 8 graphs TIERED_DECODE_MAX_T=4
BATCH_TIMEOUT=70 batch_vram bf16-t8 layout 8 graphs TIERED_DECODE_MAX_T=8  # the cut-over before session 28
SAMPLE=1 BATCH_TIMEOUT=70 batch_vram q4-sampled layout-q4 1,8,32 graphs,serial
SAMPLE=1 BATCH_TIMEOUT=70 batch_vram bf16-sampled layout 1,8,32 graphs,serial
