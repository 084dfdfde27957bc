#!/usr/bin/env bash
# Session 19, call A (cold box): the peers checkpoint and its q4+q4 and bf16 layouts, then the q4+q4 offload at
# --vram-gb 4 with replayed routing: every option at its default (the fill off), the fill auto (decode/fillpace.py),
# 8 and 6 (session 18's s18_callA.sh without its CUDA tests, which move to call B so that this call fits 600 s).
source "$(dirname "$0")/lib.sh"
peers_layouts
TIMEOUT=320 LAYOUT=layout-q4 offload_variant fill \
  "default,lru+fillauto/device,lru+fill8/device,lru+fill6/device" --device-fill auto,8,6
