#!/usr/bin/env bash
# Session 19, call E (cold box): --device-fill auto as the default (decode/fillpace.py now only lowers N to what 3/4 of
# a window's step fits; the stall back-off, which turned the fill off in call D, is gone). The q4+q4 offload at
# --vram-gb 4 with replayed routing: the default (now the fill auto), the fill off (lru/device), a fixed 6 and 8;
# then the bf16 layout and its offload: the default (fill auto, CPU experts auto) and lru/device (fill off).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
TIMEOUT=250 LAYOUT=layout-q4 offload_variant auto "default,lru/device,lru+fill6/device,lru+fill8/device" --device-fill 6,8
python3 -c "
import json; d = json.loads(open('$OUT/offload-layout-q4-auto.json').read())
for k, r in d['docs'][0]['runs'].items(): print(k, r.get('device_fill'))"
peers_layout layout source source; pack
TIMEOUT=150 offload_variant auto "default,lru/device"
python3 -c "
import json; d = json.loads(open('$OUT/offload-bf16-auto.json').read())
for k, r in d['docs'][0]['runs'].items(): print(k, r.get('device_fill'))"
