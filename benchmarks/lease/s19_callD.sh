#!/usr/bin/env bash
# Session 19, call D (cold box): the q4+q4 layout, then its offload at --vram-gb 4 with replayed routing: the fill auto
# after its retune (N never above what 3/4 of the window's step fits: decode/fillpace.py), beside fixed 6 and 8 and
# the default (fill off); the runs now record the fill's pace (device_fill). Then the q4+q4 VRAM decode: the
# lm_head's pairs at bg 16 (call C: 2,761-2,769 against 2,740-2,752) against the default, twice each, interleaved.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=300 LAYOUT=layout-q4 offload_variant fill3 \
  "lru+fillauto/device,lru+fill6/device,lru+fill8/device,default" --device-fill auto,6,8
python3 -c "
import json; d = json.loads(open('$OUT/offload-layout-q4-fill3.json').read())
for k, r in d['docs'][0]['runs'].items(): print(k, r.get('device_fill'))"
P16="gemv,q4,2048,151936:bn=32,bg=16,warps=4,algo=2,conv=2"
peers_vram q4 default; peers_vram q4 pairlm16 TIERED_QCONFIG="$P16"
peers_vram q4 default2; peers_vram q4 pairlm16b TIERED_QCONFIG="$P16"
