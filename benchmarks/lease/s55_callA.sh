#!/usr/bin/env bash
# Session 55, call A (about 420 s after the start): the overlapped gather (TIERED_GATHER_OVERLAP, on by default: the
# layer's resident experts' gate_up starts under PDL beside the gather, only the misses' programs wait for their
# rows, kernels/moe_decode.Landing). 1. its CUDA tests (tests/test_gather_overlap.py; the device step's CUDA tests,
# which now run with it); 2. bf16 at --vram-gb 4 (316 slots), five eval documents, replayed routing: the default,
# lru/device and nextuse+cpu/device with the overlap, then without it (fresh processes). The simulator
# (sim_devtable.py --overlap-us 17, this card's figures) gives +2.5 to 3 points of serial Belady.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 200 tests/test_gather_overlap.py tests/test_devtable.py
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=150 offload_variant ov1 "default,lru/device,nextuse+cpu/device" --docs 5
TIMEOUT=150 TIERED_GATHER_OVERLAP=0 offload_variant ov0 "default,lru/device,nextuse+cpu/device" --docs 5
true
