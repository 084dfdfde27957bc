#!/usr/bin/env bash
# Session 55, call D (about 230 s on a fresh box): the overlapped gather with device prefetch and next-use eviction
# after moving their kernels (the next-use update, the prefetch's id copies) before the gather, so that gate_up
# follows it directly (call C: 0.995x with the copy between them). Their CUDA tests, then nextuse+pf1/device and
# nextuse+cpu/device on two eval documents with the overlap and without (fresh processes).
source "$(dirname "$0")/lib.sh"
cuda_tests 90 tests/test_devtable.py -k "prefetch or nextuse"
peers_ckpt; peers_layout layout source source; pack
TIMEOUT=80 offload_variant pf1 "nextuse+pf1/device,nextuse+cpu/device" --docs 2
TIMEOUT=80 TIERED_GATHER_OVERLAP=0 offload_variant pf0 "nextuse+pf1/device,nextuse+cpu/device" --docs 2
true
