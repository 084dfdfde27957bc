#!/usr/bin/env bash
# Session 13, call F: the CPU kernel with 2048-byte software prefetch (PF_BYTES, call E's best) end to end:
# lru+cpu/device and nextuse+cpu/device (bf16, --vram-gb 4, replayed routing,
# csv.py.txt), each in a fresh process. Ran at 370d1a8 (PF_BYTES 2048 committed then, 0 again after: no gain end
# to end).
source "$(dirname "$0")/lib.sh"
peers_ckpt; peers_layout layout source source; pack
offload_variant pf2048 "lru+cpu/device,nextuse+cpu/device"
offload_variant pf2048b "lru+cpu/device,nextuse+cpu/device"
