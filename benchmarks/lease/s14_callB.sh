#!/usr/bin/env bash
# Session 14, call B: should --cpu-experts default to auto where the device slot table runs? q4+q4 at --vram-gb 4
# (the table holds every q4 expert once filled: the misses are first uses), with and without CPU experts, demand
# paging and with the background fill (8), each pair in a fresh process; replayed routing, one eval document.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout-q4 q4 q4; pack
LAYOUT=layout-q4 offload_variant demand "lru/device,lru+cpu/device"
LAYOUT=layout-q4 offload_variant fill "lru+fill8/device,lru+cpu+fill8/device" --device-fill 8
LAYOUT=layout-q4 offload_variant demand2 "lru+cpu/device,lru/device"
offload_variant host2 "lru/auto"
