#!/usr/bin/env bash
# Written in session 55 for the next lease (about 330 s on a fresh box; an H200 if one is lent): the overlapped
# gather at HEAD on all five eval documents, off then on (fresh processes), with the prefetch run after its reorder
# (ae16ba8; session 55's call D measured it on two documents only) and the CPU-expert runs: bf16 at --vram-gb 4,
# replayed routing. Then the device step's CUDA tests on that card.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=150 TIERED_GATHER_OVERLAP=0 offload_variant ov0 "default,lru/device,nextuse+pf1/device,nextuse+cpu/device" \
  --docs 5
TIMEOUT=150 offload_variant ov1 "default,lru/device,nextuse+pf1/device,nextuse+cpu/device" --docs 5
cuda_tests 120 tests/test_gather_overlap.py tests/test_devtable.py
true
