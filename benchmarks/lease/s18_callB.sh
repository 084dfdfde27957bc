#!/usr/bin/env bash
# Session 18, call B (warm box after A, its layouts): the bf16 offload at --vram-gb 4 with replayed routing (its
# table is full after the prefill: the fill auto should cost next to nothing), then the q4+q4 default and the fill
# auto again in a fresh process (order effects).
source "$(dirname "$0")/lib.sh"
offload_variant default "default,lru/device,lru+fillauto/device" --device-fill auto
TIMEOUT=250 LAYOUT=layout-q4 offload_variant fill2 "lru+fillauto/device,default,lru/device" --device-fill auto
