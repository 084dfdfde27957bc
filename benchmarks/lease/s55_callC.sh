#!/usr/bin/env bash
# Session 55, call C (about 330 s on a fresh box): call A's comparison in the other order (the overlap off first,
# then on; fresh processes), with the prefetch run (nextuse+pf1/device, the prefetch goal's) in place of
# nextuse+cpu/device: bf16 at --vram-gb 4, five eval documents, replayed routing.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=140 TIERED_GATHER_OVERLAP=0 offload_variant ov0b "default,lru/device,nextuse+pf1/device" --docs 5
TIMEOUT=140 offload_variant ov1b "default,lru/device,nextuse+pf1/device" --docs 5
true
