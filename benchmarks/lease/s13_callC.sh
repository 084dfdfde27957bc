#!/usr/bin/env bash
# Session 13, call C: the CPU-expert probe now takes medians of nine lone experts spread over the RAM tier (it took
# the best of five among the first keys; in call B it read 45.8-72.8 GB/s across processes and one take table sent
# a lone miss to the CPU). Three fresh processes of lru+cpu/device and nextuse+cpu/device (bf16, --vram-gb 4,
# replayed routing, csv.py.txt): the take tables, the rates the probe read, tok/s and their spread.
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
for i in 1 2 3; do offload_variant median$i "lru+cpu/device,nextuse+cpu/device"; done
