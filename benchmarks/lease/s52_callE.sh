#!/usr/bin/env bash
# Session 52, call E (for the next lease; about 450 s): --embed host, built in session 52 without a GPU. Its CUDA
# tests (tests/test_embed_host.py, test_step_io.py), then issue 12's bf16 offload at --vram-gb 4 (replayed routing,
# one eval document: every option at its default) with the embedding table on the GPU and in pinned RAM, alternating
# fresh processes (the simulator's 242 -> 308 slots: 1.30x, sim-embed-host-2026-12-06-s52.json). The offload JSON's
# expert_slots and decode tok/s give the comparison; the resident step (its compute figure) keeps the table on the GPU.
source "$(dirname "$0")/lib.sh"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$GPU"
cuda_tests 150 tests/test_embed_host.py tests/test_step_io.py
peers_ckpt; peers_layout layout source source; pack
for v in gpu host gpu2 host2; do
  [ $(( $(date +%s) - T0 )) -lt 420 ] || break
  TIMEOUT=100 offload_variant embed-$v "default" --embed ${v%2}
done
